"""How far the standard levers take the UNet's own forward pass (issue 21): what sampling can gain at most.

One bundled-model UNet call (batch 8 = 4 images with classifier-free guidance, 64 px, 77 text tokens, no grad), per
lever, interleaved round by round in one process; each lever's warm-up (compiling) is timed apart:

- eager float32 (what `generate` runs by default, and what diffusers' pipeline runs);
- bf16 autocast (`generate --bf16`), and the UNet's weights cast to bf16 (no autocast: normalisations in bf16 too);
- torch.compile (inductor) with weight freezing (`torch._inductor.config.freezing`: constant-folds the weights and
  pre-packs them for oneDNN; inference only), in float32, with bf16 weights, and under bf16 autocast.

Prints, per lever: median CPU ms per UNet call, the speed-up over eager float32, the max difference of the output
(noise prediction) to eager float32, and the warm-up. A sampling run can go faster than its UNet calls only by
calling the UNet less, so the best row here bounds what `generate` can gain at equal images.

    python benchmarks/unet_speed_levers.py --threads 1 --rounds 5
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10, help="UNet calls per lever per round")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    import torch
    import torch._inductor.config as inductor

    from conceptkit.models.loading import load_pipeline

    torch.set_num_threads(args.threads)
    inductor.freezing = True
    unet = load_pipeline("toy", device="cpu").unet.eval()
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    x = torch.randn(args.batch, unet.config.in_channels, size, size, generator=g)
    text = torch.randn(args.batch, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(500)
    bf16 = copy.deepcopy(unet).to(torch.bfloat16)

    def call(model, dtype=torch.float32, autocast=False):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return model(x.to(dtype), t, encoder_hidden_states=text.to(dtype)).sample
        return run

    levers = {
        "eager float32": call(unet),
        "eager bf16 autocast (generate --bf16)": call(unet, autocast=True),
        "eager bf16 weights": call(bf16, torch.bfloat16),
        "compile + freezing, float32": call(torch.compile(copy.deepcopy(unet))),
        "compile + freezing, bf16 weights": call(torch.compile(copy.deepcopy(bf16)), torch.bfloat16),
        "compile + freezing, bf16 autocast": call(torch.compile(copy.deepcopy(unet)), autocast=True),
    }
    outputs, warmups, times = {}, {}, {name: [] for name in levers}
    with torch.inference_mode():
        for name, run in levers.items():
            began = time.perf_counter()
            outputs[name] = run().float()
            warmups[name] = time.perf_counter() - began
        for _ in range(args.rounds):
            for name, run in levers.items():
                began = time.process_time()
                for _ in range(args.calls):
                    run()
                times[name].append((time.process_time() - began) / args.calls)
    base = statistics.median(times["eager float32"])
    print(f"bundled UNet, batch {args.batch}, {size}x{size} latents, {args.threads} thread(s), {args.rounds} "
          f"interleaved rounds of {args.calls} calls (medians)\n")
    print("| lever | CPU ms / UNet call | speed-up | max output diff vs float32 | warm-up s |")
    print("|---|---|---|---|---|")
    for name in levers:
        ms = statistics.median(times[name])
        diff = (outputs[name] - outputs["eager float32"]).abs().max().item()
        print(f"| {name} | {ms * 1000:.1f} | {base / ms:.2f}x | {diff:.1e} | {warmups[name]:.1f} |")
    load = os.getloadavg()[0]
    print(f"\nload average {load:.2f} on {os.cpu_count()} CPUs"
          f"{' (contended: other work was running)' if load > args.threads + 0.5 else ''}")


if __name__ == "__main__":
    main()
