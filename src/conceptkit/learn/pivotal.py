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


def learn_pivotal_lora(pipe, images_dir: str | Path, out_dir: str | Path, cfg: LoRAConfig, word_steps: int,
                       init: str | None = None, *, model_name: str = "", resume: bool = False, progress: bool = True,
                       on_step=None) -> LoRAResult:
    """Learn `cfg.trigger` as a word for `word_steps` Textual Inversion steps (started from `init`, default the
    class word: one vector per word of it, as AUTOMATIC1111's initialization text), then the LoRA with that word
    (OUT/word/learned_embeds.safetensors) bundled. A finished word is kept when the run is resumed. On return the
    pipeline is as it was."""
    from ..learn.textual_inversion import learn_textual_inversion
    from ..learn.ti_config import TIConfig
    from ..models.embeddings import remove_embedding

    if cfg.embedding is not None:
        raise UserError("--embedding and --pivotal-steps both give the trigger's word: pass one of them")
    out = Path(out_dir)
    word = out / WORD_FOLDER
    if not (word / "learned_embeds.safetensors").exists():
        check_new_word(pipe.tokenizer, cfg.trigger)
        init = init or cfg.class_word or "object"
        vectors = len(pipe.tokenizer(init, add_special_tokens=False).input_ids)
        ti = TIConfig(token=cfg.trigger, init_word=init, vectors=vectors, steps=word_steps, batch=cfg.batch,
                      resolution=cfg.resolution, center_crop=cfg.center_crop, seed=cfg.seed,
                      mixed_precision=cfg.mixed_precision, validation_prompts=())
        learn_textual_inversion(pipe, images_dir, word, ti, model_name=model_name, resume=resume and word.exists(),
                                progress=progress)
        remove_embedding(pipe, cfg.trigger)  # the trainer leaves the word in the pipeline; learn_lora adds it again
    return learn_lora(pipe, images_dir, out, dataclasses.replace(cfg, embedding=str(word)), model_name=model_name,
                      resume=resume, progress=progress, on_step=on_step)
