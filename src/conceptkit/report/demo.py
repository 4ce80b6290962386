"""`conceptkit demo`: the showcase on the bundled model, as one static page (OUT/index.html).

Every picture is made by a `conceptkit` command run as a subprocess (report/steps.py), and the page shows that
command under it. Then the oracle scores every generated image with the evaluate modules' own scoring, on their
held-out prompts and seeds:
1. Textual Inversion: `learn ti` on one bundled concept set, then one `generate` of evaluate ti's six prompts with
   the learned word, and of the same prompts with the best plain-text description (evaluate ti's `text` baseline);
2. CLoRA: `compose` two bundled concept LoRAs with `--method clora,merge --save-maps` (attention maps, masks), on
   evaluate clora's prompt for that pair and its held-out seeds;
3. ProFusion: `learn promptnet --finetune` on one image of evaluate profusion's first test object, then
   `generate --promptnet` with fusion sampling and with `--no-fusion`, on its five compositional prompts.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from ..errors import UserError
from ..evaluate import clora, profusion, ti
from ..files import atomic_write_text
from ..generate.images import slug
from ..generate.infotext import rendered, save_png
from ..shapes import oracle
from ..shapes.concepts import by_name, concept_folder
from ..shapes.render import render
from ..shapes.world import EVAL_SEED_BASE
from .page import Page, Picture, Section
from .steps import Step, program, run_chain, shell, shown

TI_CONCEPT = "pink-checkered-cross"
TOKEN = "<my-concept>"
PAIR = ("yellow-checkered-circle", "red-striped-triangle")  # evaluate clora test concepts, left/right
PROFUSION_OBJECT = profusion.TEST_TRIPLES[0]


@dataclass(frozen=True)
class Settings:
    ti_steps: int = 600  # the evaluated recipe (TIConfig's default)
    steps: int = 30  # DDIM steps for every picture
    seeds: int = 4  # held-out seeds per prompt (TI, ProFusion)
    compose_seeds: int = 3
    finetune_steps: int | None = None  # None: FinetuneConfig's default
    iterative_steps: str = "0"  # CLoRA's extra refinement (evaluate clora's README settings)
    iterative_steps_steps: int = 10


QUICK = Settings(ti_steps=4, steps=4, seeds=1, compose_seeds=1, finetune_steps=2, iterative_steps="",
                 iterative_steps_steps=1)


def ti_steps(out: Path, s: Settings) -> tuple[list[Step], list[str], list[str]]:
    concept = by_name(TI_CONCEPT)
    learned = out / "ti" / "learned"
    sampling = ["--seed", str(EVAL_SEED_BASE), "--num-images", str(s.seeds), "--steps", str(s.steps)]
    with_word = [t.format(TOKEN) for t, _ in ti.PROMPTS]
    with_text = [t.format(concept.description) for t, _ in ti.PROMPTS]
    steps = [
        Step("learn ti", ["learn", "ti", "--images", shown(concept_folder(concept)), "--token", TOKEN,
                          "--steps", str(s.ti_steps), "--out", shown(learned)], learned),
        Step("generate (word, text)", ["generate", "--embedding", shown(learned),
                          *[a for p in with_word + with_text for a in ("--prompt", p)], *sampling,
                          "--out", shown(out / "ti" / "images")], out / "ti" / "images"),
    ]
    return steps, with_word, with_text


def demo_case() -> "clora.Case":
    return next(c for c in clora.cases("test") if (c.left.name, c.right.name) == PAIR)


# the masks the README recommends (chosen on evaluate clora's tune split): concepts partition the image by attention
MASKS = ("--mask-exclusive", "--mask-threshold", "0", "--mask-combine", "sum")


def clora_steps(out: Path, s: Settings) -> tuple[list[Step], str]:
    case = demo_case()
    template = case.template
    files = clora.lora_files(None)
    ends = clora.bundled_ends()  # each LoRA at the end calibrated for it (README, evaluate clora)

    def lora(c) -> str:
        return f"{clora.slot(c)}={shown(files[c.name])}" + (f"@1:{ends[c.name]:g}" if ends[c.name] < 1 else "")

    args = ["compose", "--prompt", template, *[a for c in (case.first, case.second) for a in ("--lora", lora(c))],
            "--method", "clora,merge", "--seed", str(clora.EVAL_SEEDS[0]), "--num-images", str(s.compose_seeds),
            "--steps", str(s.steps), "--iterative-steps", s.iterative_steps,
            "--iterative-steps-steps", str(s.iterative_steps_steps), *MASKS, "--save-maps", "--out", shown(out / "clora")]
    return [Step("compose", args, out / "clora")], template


def profusion_steps(out: Path, s: Settings) -> tuple[list[Step], Path, list[str]]:
    reference = out / "profusion" / "reference.png"
    image = Image.fromarray(render(profusion.test_scene(PROFUSION_OBJECT)))
    save_png(image, reference, rendered(profusion.test_scene(PROFUSION_OBJECT)))
    tuned = out / "profusion" / "promptnet"
    prompts = [t.format("S*") for t, _ in ti.COMPOSITIONAL]
    sampling = [*[a for p in prompts for a in ("--prompt", p)], "--seed", str(EVAL_SEED_BASE),
                "--num-images", str(s.seeds), "--steps", str(s.steps)]
    finetune = ["--steps", str(s.finetune_steps)] if s.finetune_steps else []
    steps = [
        Step("learn promptnet", ["learn", "promptnet", "--finetune", "--image", shown(reference), *finetune,
                                 "--out", shown(tuned)], tuned),
        Step("generate --fusion", ["generate", "--promptnet", shown(tuned), *sampling, "--fusion",
                                 "--out", shown(out / "profusion" / "fusion")], out / "profusion" / "fusion"),
        Step("generate --no-fusion", ["generate", "--promptnet", shown(tuned), *sampling, "--no-fusion",
                                "--out", shown(out / "profusion" / "plain")], out / "profusion" / "plain"),
    ]
    return steps, reference, prompts


def generated(folder: Path, prompts: list[str], seeds: int) -> list[list[Path]]:
    """The files `generate` wrote, per prompt, per seed (its naming: NNN-<prompt slug>-s<seed>.png)."""
    return [[folder / f"{i * seeds + j:03d}-{slug(p)}-s{EVAL_SEED_BASE + j}.png" for j in range(seeds)]
            for i, p in enumerate(prompts)]


def load(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{path} is missing although its step finished before: run the demo again with --fresh") \
            from None


def reading(path: Path) -> str:
    """What the oracle sees, in a few words."""
    r = oracle.read(load(path))
    objects = "; ".join(f"{o.size} {o.color} {o.pattern} {o.shape} {o.position}" for o in r.objects) or "no object"
    return f"{objects} on {r.background}"


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def scored(path: Path, row: dict, key: str) -> Picture:
    """A picture captioned with the oracle's check of `key` (and of the requested attributes) and its reading."""
    asked = [a for a in ("background", "position", "size") if a in row]
    extra = f", asked {sum(row[a] for a in asked)}/{len(asked)}" if asked else ""
    return Picture(path, f"{mark(row[key])} {key}{extra}", reading(path), width=96)


def scored_grid(section: Section, prompts: list[str], columns: dict[str, tuple[list[list[Path]], list[dict]]],
                key: str, seeds: int) -> None:
    """One row per prompt, one column per way of sampling it, the held-out seeds side by side."""
    rows = []
    for i, prompt in enumerate(prompts):
        rows.append((f"“{prompt}”", [[scored(path, results[i * seeds + j], key) for j, path in enumerate(files[i])]
                                     for files, results in columns.values()]))
    seed_range = f"seed {EVAL_SEED_BASE}" if seeds == 1 else f"seeds {EVAL_SEED_BASE}–{EVAL_SEED_BASE + seeds - 1}"
    section.grid(["prompt", *columns], rows, f"{seed_range}, left to right; under each picture the oracle's check "
                                             "and, in grey, what it read")


def step_commands(section: Section, steps: list[Step]) -> None:
    for step in steps:
        how = "reused from an earlier run, which took" if step.reused else "took"
        section.command(step.command, f"{step.name} ({how} {step.seconds:.0f} s)")


def ti_section(page: Page, out: Path, s: Settings, steps: list[Step], with_word, with_text) -> dict:
    concept = by_name(TI_CONCEPT)
    requested = [r for _, r in ti.PROMPTS for _ in range(s.seeds)]
    both = generated(out / "ti" / "images", with_word + with_text, s.seeds)  # one `generate` made both
    files = {"ti": both[:len(with_word)], "text": both[len(with_word):]}
    rows = {c: [ti.score(load(p), concept, r) for p, r in zip([p for ps in f for p in ps], requested)]
            for c, f in files.items()}
    scores = {c: ti.summarise(r) for c, r in rows.items()}
    sec = page.section("Textual Inversion")
    sec.text(f"`learn ti` turns the four images of the bundled concept set `{concept.name}` into a new word "
             f"`{TOKEN}` ({s.ti_steps} steps; only the word's vector is trained, the model stays frozen). The six "
             "prompts and the held-out seeds are `evaluate ti`'s. Fidelity: the oracle reads the concept's shape, "
             "colour and pattern, all three. Adherence: the requested background, position and size (the last five "
             "prompts). The baseline writes the concept in words instead: "
             f"“{concept.description}”.")
    sec.pictures([Picture(p, f"training image {p.stem}") for p in sorted(concept_folder(concept).glob("*.png"))],
                 "the concept set")
    sec.table(["prompt with", "images", "fidelity", "adherence", "background", "position", "size"],
              [[name, len(rows[c]), scores[c]["fidelity"], scores[c]["adherence"], scores[c]["adherence_background"],
                scores[c]["adherence_position"], scores[c]["adherence_size"]]
               for c, name in (("ti", f"the learned word {TOKEN}"), ("text", f"the words “{concept.description}”"))],
              "oracle scores")
    sec.heading("The pictures")
    scored_grid(sec, [t.format("…") for t, _ in ti.PROMPTS],
                {f"with the word {TOKEN}": (files["ti"], rows["ti"]),
                 f"with the words “{concept.description}” (baseline)": (files["text"], rows["text"])}, "fidelity", s.seeds)
    step_commands(sec, steps)
    return scores


def clora_section(page: Page, out: Path, s: Settings, steps: list[Step], template: str) -> dict:
    case = demo_case()
    a, b = case.left, case.right
    seeds = [clora.EVAL_SEEDS[0] + k for k in range(s.compose_seeds)]
    methods = ("clora", "merge")
    reads = {m: [clora.read_pair(load(out / "clora" / m / f"s{seed}.png"), a, b) for seed in seeds]
             for m in methods}
    scores = {m: clora.summarise(r) for m, r in reads.items()}
    sec = page.section("Composing two LoRAs: CLoRA")
    sec.text(f"Two bundled concept LoRAs, `{a.name}` (trigger `{clora.trigger(a)}`) and `{b.name}` (trigger "
             f"`{clora.trigger(b)}`, each a word the LoRA file bundles), in one prompt: `{template}`, at "
             "`evaluate clora`'s held-out seeds. "
             "`clora` runs one branch per LoRA, updates the latent so that each concept's cross-attention map "
             "separates from the other's, and blends the branches with masks from those maps; `merge` (the "
             "baseline) turns both LoRAs on at once. Success: the oracle finds two objects, the left one with the "
             "left concept's shape, colour and pattern and the right one with the right concept's; concepts found "
             "gives partial credit.")
    sec.table(["method", "images", "success", "concepts found"],
              [[m, len(reads[m]), scores[m]["success"], scores[m]["concepts_found"]] for m in methods], "oracle scores")
    grid = []
    for k, seed in enumerate(seeds):
        pictures = [[Picture(out / "clora" / m / f"s{seed}.png", f"found {reads[m][k].found}/2, success "
                             f"{mark(reads[m][k].success)}", reading(out / "clora" / m / f"s{seed}.png"))] for m in methods]
        pictures += [[Picture(out / "clora" / "clora" / f"s{seed}-{what}.png")] for what in ("attention", "masks")]
        grid.append((f"seed {seed}", pictures))
    sec.grid(["", *methods, "clora: each concept's attention map in its branch (rows: steps)",
              "clora: each branch's mask (base, then one per concept)"], grid,
             "under each picture the oracle's check and, in grey, what it read (objects left to right)")
    step_commands(sec, steps)
    return scores


def profusion_section(page: Page, out: Path, s: Settings, steps: list[Step], reference: Path, prompts) -> dict:
    triple = PROFUSION_OBJECT
    requested = [r for _, r in ti.COMPOSITIONAL for _ in range(s.seeds)]
    files = {m: generated(out / "profusion" / m, prompts, s.seeds) for m in ("fusion", "plain")}
    rows = {m: [profusion.score(load(p), triple, r) for p, r in zip([p for ps in f for p in ps], requested)]
            for m, f in files.items()}
    scores = {m: profusion.summarise(r) for m, r in rows.items()}
    name = " ".join((triple[1], triple[2], triple[0]))
    sec = page.section("One image, one word: ProFusion")
    sec.text(f"One image of a {name} (a shape/colour/pattern combination the bundled PromptNet never saw; "
             "`evaluate profusion`'s first test object). `learn promptnet --finetune` adapts the bundled PromptNet "
             "and the UNet's attention projections to it (seconds); PromptNet then turns the image into the word S* "
             "for any prompt. Fusion sampling (with the PromptNet folder's recommended settings) against plain "
             "sampling, on the five compositional prompts. Preservation: the object's shape, colour and pattern, "
             "all three; adherence: the requested background, position and size.")
    sec.pictures([Picture(reference, "the one image")])
    sec.table(["sampling", "images", "preservation", "shape", "colour", "pattern", "adherence", "background",
               "position", "size"],
              [[m, len(rows[m]), *(scores[m][k] for k in ("preservation", "preservation_shape", "preservation_color",
                                                          "preservation_pattern", "adherence", "adherence_background",
                                                          "adherence_position", "adherence_size"))]
               for m in ("fusion", "plain")], "oracle scores")
    sec.heading("The pictures")
    scored_grid(sec, prompts, {"fusion sampling": (files["fusion"], rows["fusion"]),
                               "plain sampling (--no-fusion)": (files["plain"], rows["plain"])}, "preservation", s.seeds)
    step_commands(sec, steps)
    return scores


def at_a_glance(section: Section, scores: dict, s: Settings) -> None:
    t, c, p = scores["ti"], scores["clora"], scores["profusion"]
    section.table(["method", "images", "oracle score", "", "oracle score", ""], [
        [f"Textual Inversion: the learned word {TOKEN}", 6 * s.seeds, "fidelity", t["ti"]["fidelity"],
         "adherence", t["ti"]["adherence"]],
        ["  baseline: the concept in words", 6 * s.seeds, "fidelity", t["text"]["fidelity"],
         "adherence", t["text"]["adherence"]],
        ["CLoRA: two concept LoRAs composed", s.compose_seeds, "success", c["clora"]["success"],
         "concepts found", c["clora"]["concepts_found"]],
        ["  baseline: both LoRAs merged", s.compose_seeds, "success", c["merge"]["success"],
         "concepts found", c["merge"]["concepts_found"]],
        ["ProFusion: fusion sampling", 5 * s.seeds, "preservation", p["fusion"]["preservation"],
         "adherence", p["fusion"]["adherence"]],
        ["  baseline: plain sampling", 5 * s.seeds, "preservation", p["plain"]["preservation"],
         "adherence", p["plain"]["adherence"]],
    ])
    section.text("Each score is the share of images (or, for adherence, of requested attributes) the oracle reads as "
                 "asked; the sections below define them and show every picture with its reading. These are a few "
                 "seeds each: the README's tables (`conceptkit evaluate ...`) use many more.")


def run_demo(out: str | Path = "outputs/demo", *, quick: bool = False, fresh: bool = False,
             command: str = "") -> Path:
    """Run the showcase into `out` and write out/index.html (and out/demo.json); returns the page's path."""
    began = time.perf_counter()
    out = Path(out)
    s = QUICK if quick else Settings()
    ti_chain, with_word, with_text = ti_steps(out, s)
    clora_chain, template = clora_steps(out, s)
    pf_chain, reference, prompts = profusion_steps(out, s)
    for chain in (ti_chain, clora_chain, pf_chain):
        run_chain(chain, fresh=fresh)
    page = Page(out, "conceptkit showcase" + (" (--quick: tiny settings, not meaningful scores)" if quick else ""),
                [f"Three ways to teach the bundled shapes-world model new concepts, each picture made by the command "
                 f"under it (run from `{Path.cwd()}`; `{program()[1]}` is `{shown(program()[0][-1])}` there) and "
                 "scored by the oracle (`conceptkit shapes read`), which reads a generated image back into a "
                 "background and objects with shape, colour, pattern, position and size. Prompts and seeds are the "
                 "held-out ones of the `conceptkit evaluate` benchmarks, with fewer seeds."])
    glance = page.section("At a glance")
    scores = {"ti": ti_section(page, out, s, ti_chain, with_word, with_text),
              "clora": clora_section(page, out, s, clora_chain, template),
              "profusion": profusion_section(page, out, s, pf_chain, reference, prompts)}
    at_a_glance(glance, scores, s)
    steps = ti_chain + clora_chain + pf_chain
    total = time.perf_counter() - began
    timing = page.section("Time")
    timing.table(["step", "seconds", "reused from an earlier run"],
                 [[st.name, f"{st.seconds:.1f}", "yes" if st.reused else "no"] for st in steps]
                 + [["**all steps**", f"**{sum(st.seconds for st in steps):.1f}**", ""],
                    ["this run of the demo (the steps it ran, scoring, this page)", f"{total:.1f}", ""]])
    if command:
        timing.command(command, "this page")
    index = page.write()
    summary = {"settings": asdict(s), "quick": quick, "seconds": round(total, 1),
               "steps_seconds": round(sum(st.seconds for st in steps), 1), "scores": scores,
               "steps": [{"name": st.name, "command": shell([program()[1], *st.args], 10**6), "seconds": st.seconds,
                          "reused": st.reused} for st in steps]}
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2) + "\n")
    return index
