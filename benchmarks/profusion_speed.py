"""ProFusion speed: PromptNet fine-tuning on one image, and plain / fusion / reference sampling (s/image).

- Fine-tune: `finetune_promptnet` with the default `FinetuneConfig` (100 steps, PromptNet + UNet to_q/to_k/to_v) on
  one rendered shapes-world image; the issue's target is < 60 s on 2 CPU cores.
- Generation, all with the same DDIM steps, one batch of `--batch` images (one prompt, generators seeded 0..B-1):
  `plain` is `FusionConfig.plain()` (CFG, one UNet call on [∅, c] per step); `fusion` is `FusionConfig()` (one fusion
  sub-step on [∅, c_λ] plus the main step on [∅, c, r]: 5 single-sample UNet evaluations per step); `reference` is
  `FusionConfig.reference()`, the official code's execution (one UNet call per condition, the discarded reference
  branch computed in the fusion sub-step, prompts re-encoded at every call: 6 evaluations per step).
  The timed span is a whole batch (reference encoding, the denoising loop, VAE decode to PIL), the median of
  `--repeats` after one untimed warm-up; s/image = that / batch.
- UNet evaluations are counted by a forward pre-hook on `pipe.unet` (the `sample` batch of every call, divided by
  batch and steps). "allowed" = plain s/image × (evals / plain evals) × 1.10: fusion is "within" when it costs no
  more per evaluation than plain sampling, give or take 10%.

Speed does not depend on the PromptNet's weights: without `--promptnet` and the bundled one, an untrained PromptNet
is built from the UNet. Run: `python benchmarks/profusion_speed.py` (`--json FILE` also writes the numbers).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "a large S* on the left, on a navy background"
FINETUNE_TARGET_S = 60.0
TOLERANCE = 1.10


def reference_scene():
    from conceptkit.shapes.world import Obj, Scene

    return Scene("navy", (Obj("star", "red", "striped", "center", "large"),), ((0, 0),))


def write_reference(folder: Path) -> Path:
    from PIL import Image

    from conceptkit.shapes.render import render

    path = folder / "reference.png"
    Image.fromarray(render(reference_scene())).save(path, format="PNG")
    return path


def get_promptnet(pipe, args):
    """(SavedPromptNet, where it came from)."""
    from conceptkit.learn.promptnet import default_image_encoder
    from conceptkit.models.loading import BUNDLED_PROMPTNET
    from conceptkit.profusion.promptnet import PromptNet
    from conceptkit.profusion.saved import SavedPromptNet, load_promptnet

    if args.promptnet:
        return load_promptnet(args.promptnet, pipe), f"--promptnet {args.promptnet}"
    if args.model == "toy" and BUNDLED_PROMPTNET.is_dir():
        return load_promptnet(BUNDLED_PROMPTNET, pipe), f"bundled ({BUNDLED_PROMPTNET})"
    encoder = default_image_encoder(pipe)
    text_dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    torch.manual_seed(0)
    net = PromptNet.from_unet(pipe.unet, encoder.embed_dim, text_dim).to(pipe.unet.device, torch.float32)
    net = net.eval().requires_grad_(False)
    return SavedPromptNet(net, encoder, {}), "untrained (PromptNet.from_unet; no bundled PromptNet found)"


class UNetCounter:
    """Counts UNet calls and single-sample evaluations (the batch of `sample`) through a forward pre-hook."""

    def __init__(self, unet):
        self.calls = self.evals = 0
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.calls += 1
        self.evals += sample.shape[0]

    def reset(self):
        self.calls = self.evals = 0

    def remove(self):
        self.handle.remove()


def time_finetune(pipe, saved, image: Path, out: Path, steps: int | None) -> dict:
    from conceptkit.learn.promptnet import finetune_promptnet
    from conceptkit.learn.promptnet_config import FinetuneConfig
    from conceptkit.profusion.saved import SavedPromptNet

    cfg = FinetuneConfig() if steps is None else FinetuneConfig(steps=steps)
    # fine-tuning starts from a pre-trained PromptNet: drop tuned UNet weights if --promptnet was a fine-tuned one
    pretrained = SavedPromptNet(saved.promptnet, saved.image_encoder, saved.meta, None, saved.folder)
    began = time.perf_counter()
    result = finetune_promptnet(pipe, pretrained, image, out, cfg, progress=False)
    wall = time.perf_counter() - began
    return {"steps": cfg.steps, "batch": cfg.batch, "seconds": result.seconds, "wall_seconds": wall,
            "seconds_per_step": result.seconds / cfg.steps}


def time_generation(pipe, saved, reference: torch.Tensor, cfg, batch: int, repeats: int, counter: UNetCounter) -> dict:
    from conceptkit.profusion.sampling import decode, sample

    prompts = [PROMPT] * batch

    def one_batch() -> float:
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        began = time.perf_counter()
        decode(pipe, sample(pipe, saved, reference, prompts, cfg, gens))
        return time.perf_counter() - began

    one_batch()  # warm-up
    times = []
    for _ in range(repeats):
        counter.reset()
        times.append(one_batch())
    return {"seconds_per_image": statistics.median(times) / batch, "batch_seconds": times,
            "unet_evals_per_step": counter.evals / (batch * cfg.steps),
            "unet_calls_per_step": counter.calls / cfg.steps}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="toy (default) or a diffusers folder")
    parser.add_argument("--promptnet", help="a PromptNet folder (default: the bundled one, else an untrained one)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of every method")
    parser.add_argument("--batch", type=int, default=4, help="images per sample() call")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per method (median), after a warm-up")
    parser.add_argument("--finetune-steps", type=int, help="default: FinetuneConfig's (100)")
    parser.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from conceptkit.learn.images import load_reference_image
    from conceptkit.models.loading import load_pipeline
    from conceptkit.profusion.sampling import FusionConfig

    began = time.perf_counter()
    pipe = load_pipeline(args.model, dtype=torch.float32, device=args.device)
    dtypes = {m: getattr(pipe, m).dtype for m in ("unet", "vae", "text_encoder")}
    if any(d != torch.float32 for d in dtypes.values()):
        pipe.to(dtype=torch.float32)
    saved, source = get_promptnet(pipe, args)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    methods = {"plain": FusionConfig.plain(steps=args.steps), "fusion": FusionConfig(steps=args.steps),
               "reference": FusionConfig.reference(steps=args.steps)}
    rows, finetune = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        image = write_reference(Path(tmp))
        reference = load_reference_image(image, resolution)
        if not args.no_finetune:
            finetune = time_finetune(pipe, saved, image, Path(tmp) / "finetuned", args.finetune_steps)
            print(f"fine-tune: {finetune['seconds']:.1f} s", file=sys.stderr)
        counter = UNetCounter(pipe.unet)
        try:
            for name, cfg in methods.items():
                rows[name] = time_generation(pipe, saved, reference, cfg, args.batch, args.repeats, counter)
                print(f"{name}: {rows[name]['seconds_per_image']:.3f} s/image", file=sys.stderr)
        finally:
            counter.remove()

    plain = rows["plain"]
    for name, r in rows.items():
        r["x_plain"] = r["seconds_per_image"] / plain["seconds_per_image"]
        r["allowed_seconds_per_image"] = (TOLERANCE * plain["seconds_per_image"]
                                          * r["unet_evals_per_step"] / plain["unet_evals_per_step"])
    rows["fusion"]["within"] = rows["fusion"]["seconds_per_image"] <= rows["fusion"]["allowed_seconds_per_image"]

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{args.threads} CPU thread(s)"
    print(f"ProFusion, model {args.model} ({resolution}px, float32), PromptNet: {source}; {args.steps} DDIM steps, "
          f"batch {args.batch}, median of {args.repeats} after a warm-up, {where}, torch {torch.__version__}\n")
    print("| method | UNet evals/step | UNet calls/step | s/image | × plain | allowed s/image | within |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        within = {True: "yes", False: "**no**"}.get(r.get("within"), "—")
        print(f"| {name} | {r['unet_evals_per_step']:g} | {r['unet_calls_per_step']:g} | {r['seconds_per_image']:.3f} "
              f"| {r['x_plain']:.2f}x | {r['allowed_seconds_per_image']:.3f} | {within} |")
    if finetune:
        ok = "yes" if finetune["seconds"] < FINETUNE_TARGET_S else "**no**"
        print(f"\nfine-tune ({finetune['steps']} steps, batch {finetune['batch']}): {finetune['seconds']:.1f} s, "
              f"{finetune['seconds_per_step']:.3f} s/step (target < {FINETUNE_TARGET_S:.0f} s on 2 CPU cores; "
              f"under it here: {ok})")
    total = time.perf_counter() - began
    print(f"\nwall time {total:.0f} s", file=sys.stderr)
    if args.json:
        out = {"model": args.model, "resolution": resolution, "promptnet": source, "steps": args.steps,
               "batch": args.batch, "repeats": args.repeats, "threads": args.threads, "device": args.device,
               "torch": torch.__version__, "prompt": PROMPT, "tolerance": TOLERANCE, "methods": rows,
               "finetune": finetune, "finetune_target_seconds": FINETUNE_TARGET_S, "wall_seconds": total}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
