"""Do a model's cross-attention maps say *where* each noun is? CLoRA's masks assume they do.

For two-object prompts of the held-out pair set ("a red circle on the left and a blue square on the right, ..."),
sample with the base model and record, at each map resolution, the horizontal centre of mass of each noun's map
(0 = left edge, 1 = right edge; the map's minimum subtracted). A model whose maps localize puts the left noun's
centre well left of the right noun's: the table reports the mean gap (right noun's centre minus left noun's) and
how often the left noun's centre is the lefter one, over steps 1/3, 2/3 and the last of the denoising.
`--tokens` adds, per token role (start, each word, end-of-text, padding), the share of attention it receives and
its map's horizontal centre: which tokens the maps actually look at, and which of them say where.

    python benchmarks/attention_localization.py --seeds 4 [--tokens]
"""
from __future__ import annotations

import argparse

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolutions", default="16,8,4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", action="store_true", help="per-token attention share and map centre")
    parser.add_argument("--split", choices=["test", "tune"], default="test",
                        help="tune: other colour/shape pairs and seeds, for choosing recipes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from conceptkit.models.loading import load_pipeline

    pipe = load_pipeline(args.model)
    rows, token_rows = measure(pipe, [int(r) for r in args.resolutions.split(",")], args.seeds, args.steps,
                               args.split, args.tokens)
    print("| maps | mean centre gap (right noun - left noun) | left noun lefter |")
    print("|---|---|---|")
    for res, row in rows.items():
        print(f"| {res}x{res} | {row['gap']:.3f} | {row['left_noun_lefter']:.2f} |")
    for res, roles in token_rows.items():
        print(f"\n{res}x{res} maps: | token | attention share | map centre x (0 left, 1 right) |")
        print("|---|---|---|")
        for role, values in roles.items():
            v = torch.tensor(values)
            print(f"| {role} | {v[:, 0].mean():.3f} | {v[:, 1].mean():.2f} |")


def measure(pipe, resolutions: list[int], seeds: int = 4, steps: int = 30, split: str = "test",
            tokens: bool = False) -> tuple[dict, dict]:
    """({res: {"gap", "left_noun_lefter"}}, {res: {token role: [(share, centre x), ...]}} when tokens)."""
    from conceptkit.compose.config import CLoRAConfig
    from conceptkit.compose.branches import Branches
    from conceptkit.compose.sampler import sample
    from conceptkit.evaluate.prompts import TUNE_SEED_BASE
    from conceptkit.shapes.world import EVAL_SEED_BASE

    pairs = [("red", "circle", "blue", "square", "gray"), ("green", "triangle", "pink", "cross", "white"),
             ("yellow", "diamond", "purple", "circle", "navy"), ("orange", "square", "cyan", "triangle", "teal")]
    seed_base = EVAL_SEED_BASE
    if split == "tune":
        pairs = [("pink", "square", "green", "diamond", "brown"), ("blue", "cross", "yellow", "triangle", "gray"),
                 ("cyan", "circle", "red", "cross", "teal"), ("purple", "triangle", "orange", "diamond", "white")]
        seed_base = TUNE_SEED_BASE
    rows, token_rows = {}, {}
    for res in resolutions:
        cfg = CLoRAConfig(steps=steps, latent_update=False, attn_res=res)
        gaps = []
        roles: dict[str, list[tuple[float, float]]] = {}
        for c1, s1, c2, s2, bg in pairs:
            prompt = f"a {c1} {s1} on the left and a {c2} {s2} on the right, on a {bg} background"
            names = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(prompt).input_ids)
            left, right = names.index(f"{s1}</w>"), names.index(f"{s2}</w>")
            for seed in range(seeds):
                r = sample(pipe, [Branches([prompt], [""], [{}])], cfg, groups=None, mask_indices=None,
                           generator=torch.Generator().manual_seed(seed_base + 8000 + seed), record=True)
                for step in (steps // 3, 2 * steps // 3, steps - 1):
                    m = r.trace.maps[step][0].float()
                    xs = torch.linspace(0, 1, m.shape[1])

                    def centre(k):
                        a = m[:, :, k] - m[:, :, k].min()
                        return float((a.sum(0) * xs).sum() / a.sum())

                    gaps.append(centre(right) - centre(left))
                    if tokens:
                        share = m.sum(dim=(0, 1)) / m.sum()
                        for k, role in enumerate(token_roles(names, m.shape[2])):
                            roles.setdefault(role, []).append((float(share[k]), centre(k)))
        gaps = torch.tensor(gaps)
        rows[res] = {"gap": round(float(gaps.mean()), 4), "left_noun_lefter": round(float((gaps > 0).float().mean()), 4)}
        if tokens:
            token_rows[res] = roles
    return rows, token_rows


def token_roles(tokens: list[str], length: int) -> list[str]:
    """A role name per token slot of 'a C1 S1 on the left and a C2 S2 on the right, on a BG background': the
    words by their place (colour1, shape1, ...), so prompts with different words pool; padding slots pool too."""
    words = ["start", "a", "colour1", "shape1", "on", "the", "left", "and", "a ", "colour2", "shape2", "on ", "the ",
             "right", ",", "on  ", "a  ", "bg", "background", "end"]
    roles = [words[i] if i < len(words) else "?" for i in range(len(tokens))]
    return (roles + ["padding"] * length)[:length]


if __name__ == "__main__":
    main()
