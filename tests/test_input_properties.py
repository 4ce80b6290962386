"""Property-based tests (Hypothesis) for the text a user types: compose templates and slots, --lora and --embedding
specs, prompt files, training templates and placeholder tokens. Any input gives a valid result or a UserError,
never another exception; where a format can be written and read back, it round-trips."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from transformers import CLIPTokenizer

from conceptkit.commands.compose import compose_config
from conceptkit.generate.loading import split_lora_spec
from conceptkit.compose.prompts import ConceptSlot, branch_prompts, fill, template_slots, token_spans
from conceptkit.compose.run import LoraSpec
from conceptkit.errors import UserError
from conceptkit.generate.prompts import read_prompt_file
from conceptkit.learn.templates import load_templates
from conceptkit.learn.textual_inversion import placeholder_tokens, training_tokenizer
from conceptkit.learn.ti_config import TIConfig
from conceptkit.models.embeddings import check_prompt_tokens, split_spec
from conceptkit.models.loading import bundled_model_path

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)
braces = st.text(alphabet="ab {}:=,.<>_ \n\t0", max_size=40)  # what template and spec parsers care about
WORDS = ["red", "circle", "square", "object", "blue", "star", "on", "the", "left", "a", "z", "q"]


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(bundled_model_path() / "tokenizer", local_files_only=True)


def user_error_or(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        assert str(e)  # (cli.main prints it on one line, escaping line breaks quoted from the input)
        return None


@FAST
@given(st.one_of(text, braces))
def test_template_slots_any_text(template):
    names = user_error_or(template_slots, template)
    if names is not None:
        assert names and len(set(names)) == len(names)
        assert all("{" + n + "}" in template for n in names)


@FAST
@given(st.one_of(text, braces))
def test_fill_round_trips(template):
    """Filling every slot with its own '{name}' gives the template back; text between slots is kept."""
    segments = fill(template, {n: "{" + n + "}" for n in template_slots_or_empty(template)})
    assert "".join(t for t, _ in segments) == template


def template_slots_or_empty(template):
    try:
        return template_slots(template)
    except UserError:
        import re

        return re.findall(r"\{([^{}]*)\}", template)


@FAST
@given(st.lists(st.sampled_from(WORDS), min_size=0, max_size=8), st.lists(st.sampled_from(["a", "b", "c"]),
       min_size=1, max_size=3, unique=True), st.sampled_from(WORDS), st.sampled_from(WORDS), st.integers(0, 10))
def test_branch_prompts_on_the_toy_tokenizer(tokenizer, words, slots, trigger, class_word, seed):
    """Templates made of the world's words: the concept groups point at the class word's tokens in every branch."""
    import random

    rng = random.Random(seed)
    parts = list(words)
    for s in slots:
        parts.insert(rng.randint(0, len(parts)), "{" + s + "}")
    template = " ".join(parts)
    concepts = [ConceptSlot(s, trigger, class_word) for s in slots]
    result = user_error_or(branch_prompts, tokenizer, template, concepts)
    assert result is not None  # space-separated slots of single-token words always work
    assert len(result.prompts) == len(slots) + 1
    for c, concept in enumerate(result.concepts):
        for p, prompt in enumerate(result.prompts):
            ids = tokenizer(prompt).input_ids
            got = tokenizer.decode([ids[i] for i in result.groups[c][p]]).strip()
            assert got == concept.phrase(with_trigger=(p == c + 1))


@FAST
@given(st.lists(st.tuples(st.one_of(text, braces), st.sampled_from([None, "a"]))), )
def test_token_spans_any_segments(tokenizer, segments):
    segs = [(t, n) for t, n in segments]
    names = [n for _, n in segs if n]
    assume(len(set(names)) == len(names))
    user_error_or(token_spans, tokenizer, segs)


@FAST
@given(st.one_of(text, braces))
@example("0=:")  # found by Hypothesis in CI: an empty file name was accepted
def test_lora_spec_parse_any_text(spec):
    parsed = user_error_or(LoraSpec.parse, spec)
    if parsed is not None:
        assert parsed.name and parsed.path


names_ = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-0123456789", min_size=1, max_size=10)
paths_ = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-./0123456789", min_size=1, max_size=20)


@FAST
@given(names_, paths_, st.one_of(st.none(), names_), st.one_of(st.none(), names_))
def test_lora_spec_round_trips(name, path, trigger, class_word):
    spec = f"{name}={path}" + (f":{trigger or ''}" if trigger or class_word else "") + \
        (f":{class_word}" if class_word else "")
    parsed = LoraSpec.parse(spec)
    assert (parsed.name, parsed.path, parsed.class_word) == (name, path, class_word)
    assert parsed.trigger == trigger


@FAST
@given(st.one_of(text, braces))
def test_split_lora_spec_any_text(spec):
    result = user_error_or(split_lora_spec, spec)
    if result is not None:
        import math

        assert math.isfinite(result[1])


@FAST
@given(paths_, st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_split_lora_spec_round_trips(path, weight):
    assume(not Path(f"{path}:{weight!r}").exists())
    assert split_lora_spec(f"{path}:{weight!r}") == (Path(path), weight)


@FAST
@given(st.one_of(text, braces))
def test_embedding_spec_any_text(spec):
    path, token = split_spec(spec)
    assert token is None or token


@FAST
@given(paths_, st.text(alphabet="<>abcdefghij-_*", min_size=1, max_size=12))
def test_embedding_spec_round_trips(path, token):
    assume(":" not in token and not Path(f"{path}:{token}").exists())
    assert split_spec(f"{path}:{token}") == (Path(path), token)


@FAST
@given(st.one_of(text, braces))
def test_prompt_placeholders_any_text(tokenizer, prompt):
    user_error_or(check_prompt_tokens, tokenizer, [prompt])


@FAST
@given(st.binary(max_size=300))
def test_prompt_file_any_bytes(tmp_path, data):
    path = tmp_path / "prompts.txt"
    path.write_bytes(data)
    prompts = user_error_or(read_prompt_file, path)
    if prompts is not None:
        assert prompts and all(p == p.strip() and p and not p.startswith("#") for p in prompts)
        assert "\ufeff" not in prompts[0][:1]


line = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zl", "Zp", "Cc")), min_size=1, max_size=40)


@FAST
@given(st.lists(line.map(str.strip).filter(lambda s: s and not s.startswith("#")), min_size=1, max_size=6),
       st.booleans())
def test_prompt_file_round_trips(tmp_path, prompts, bom):
    path = tmp_path / "prompts.txt"
    assume(all(len(p.splitlines()) == 1 and p.strip() == p and "\ufeff" not in p for p in prompts))
    path.write_text(("\ufeff" if bom else "") + "\n".join(prompts) + "\n", encoding="utf-8")
    assert read_prompt_file(path) == prompts


@FAST
@given(st.one_of(text, braces), st.booleans())
def test_template_file_any_text(tmp_path, content, latin1):
    path = tmp_path / "templates.txt"
    path.write_bytes(content.encode("latin-1", "replace") if latin1 else content.encode("utf-8"))
    templates = user_error_or(load_templates, str(path))
    if templates is not None:
        assert all(t.format("S*").count("S*") >= 1 for t in templates)


@FAST
@given(st.one_of(text, st.text(alphabet="<>ab *_-", max_size=10)), st.integers(1, 3))
def test_training_token_any_name(tokenizer, token, vectors):
    """A --token either becomes `vectors` new, consecutive tokens or is refused in one line."""
    tok = user_error_or(training_tokenizer, tokenizer, TIConfig(token=token, vectors=vectors))
    if tok is not None:
        names = placeholder_tokens(token, vectors)
        assert tok.convert_tokens_to_ids(names) == list(range(len(tokenizer), len(tokenizer) + vectors))


@FAST
@given(st.one_of(text, st.text(alphabet="0123456789, -x", max_size=15)))
def test_iterative_steps_any_text(value):
    args = argparse.Namespace(iterative_steps=value)
    cfg = user_error_or(compose_config, args)
    if cfg is not None:
        assert all(isinstance(v, int) for v in cfg.iterative_steps)
