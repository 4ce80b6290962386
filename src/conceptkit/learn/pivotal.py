"""Pivotal tuning in one run: the trigger is learned first as a new word by Textual Inversion (OUT/word/), then the
LoRA trains with that word fixed and bundles it into its file (learn/lora.py, `LoRAConfig.embedding`). It is what
`learn ti` followed by `learn lora --embedding` does, and the recipe of the shipped concept LoRAs (evaluate/clora.py
`Recipe`: 600 word steps from the class word); diffusers' advanced DreamBooth LoRA script offers the same in one
command (`--train_text_encoder_ti`, there trained jointly)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import UserError
from .lora import LoRAResult, learn_lora
from .lora_config import LoRAConfig

WORD_FOLDER = "word"


def check_new_word(tokenizer, trigger: str) -> None:
    """The word is learned as new token(s): a trigger the vocabulary already holds cannot be one."""
    if trigger in tokenizer.get_vocab():
        raise UserError(f"--trigger '{trigger}' is already in the model's vocabulary, so it cannot be learned as a new "
                        f"word: pass a new token such as '<{trigger.strip('<>') or 'concept'}>'")


def learn_word(pipe, images_dir: str | Path, out_dir: Path, token: str, init: str, steps: int, *, seed: int = 0,
               batch: int = 4, resolution: int | None = None, center_crop: bool = False, mixed_precision: str = "no",
               resume: bool = False, progress: bool = True) -> Path:
    """Pivotal tuning's first stage: `token` learned as a new word for `steps` Textual Inversion steps into
    `out_dir`, started from `init` (one vector per word of it, as AUTOMATIC1111's initialization text); kept if
    already finished. The pipeline is left without the word (learn_lora adds it). Returns the embedding file."""
    from ..learn.textual_inversion import learn_textual_inversion
    from ..learn.ti_config import TIConfig
    from ..models.embeddings import remove_embedding

    final = out_dir / "learned_embeds.safetensors"
    if final.exists():
        return final
    check_new_word(pipe.tokenizer, token)
    vectors = len(pipe.tokenizer(init, add_special_tokens=False).input_ids)
    cfg = TIConfig(token=token, init_word=init, vectors=vectors, steps=steps, batch=batch, resolution=resolution,
                   center_crop=center_crop, seed=seed, mixed_precision=mixed_precision, validation_prompts=())
    learn_textual_inversion(pipe, images_dir, out_dir, cfg, resume=resume and out_dir.exists(), progress=progress)
    remove_embedding(pipe, token)  # the trainer leaves the word in the pipeline
    return final


def learn_pivotal_lora(pipe, images_dir: str | Path, out_dir: str | Path, cfg: LoRAConfig, word_steps: int,
                       init: str | None = None, *, model_name: str = "", resume: bool = False, progress: bool = True,
                       on_step=None) -> LoRAResult:
    """Learn `cfg.trigger` as a word for `word_steps` Textual Inversion steps on the same images (started from
    `init`, default the class word), then the LoRA with that word (OUT/word/learned_embeds.safetensors) bundled. A
    finished word is kept when the run is resumed. On return the pipeline is as it was."""
    if cfg.embedding is not None:
        raise UserError("--embedding and --pivotal-steps both give the trigger's word: pass one of them")
    out = Path(out_dir)
    word = out / WORD_FOLDER
    learn_word(pipe, images_dir, word, cfg.trigger, init or cfg.class_word or "object", word_steps, seed=cfg.seed,
               batch=cfg.batch, resolution=cfg.resolution, center_crop=cfg.center_crop,
               mixed_precision=cfg.mixed_precision, resume=resume, progress=progress)
    return learn_lora(pipe, images_dir, out, dataclasses.replace(cfg, embedding=str(word)), model_name=model_name,
                      resume=resume, progress=progress, on_step=on_step)
