"""Token grounding for the lab model: each object's words should attend to that object's pixels.

Measured on the v3 model (`benchmarks/attention_localization.py --tokens`): cross-attention is almost uniform over
the 40 token slots (every slot gets 0.015-0.048 of the attention, uniform is 0.025; the 20 padding slots take 46 %
in total). A causal text encoder puts the whole prompt into its end-of-text and padding states, so averaging every
token already hands the UNet the whole prompt, and nothing pushes the attention to choose: the UNet reads the text
as one pooled vector, nouns' maps say nothing about where their object is, and binding two objects' attributes to
two places has to happen in the convolutions.

The training loss added here is TokenCompose's token loss (Wang et al., CVPR 2024, "TokenCompose: Text-to-Image
Diffusion with Token-level Supervision"): for a token t that names an object with mask M, and a cross-attention
map A_t over the query positions of one layer (averaged over heads),

    L_token = (1 - sum_{q in M} A_t[q] / sum_q A_t[q])^2,

averaged over the grounded tokens and the captured layers. The shapes world knows every object's box exactly, so
M is the box's coverage of each map cell. The architecture does not change: the model still loads in vanilla
diffusers; only how it is trained does.
"""
from __future__ import annotations

import torch

from .world import COLORS, IMAGE_SIZE, NAMED_SHAPES, PATTERNS, POSITIONS, SIZES, Scene, object_box

# The words of an object phrase that describe the object itself (not articles or position words).
OBJECT_WORDS = frozenset([*COLORS, *NAMED_SHAPES, "object", *PATTERNS, "stripes", "dots", "checks", *SIZES])
# The last word of each position phrase ('on the left'). In a causal text encoder it is the one token of the phrase
# that has seen the whole object ('a red circle on the left'), so grounding it gives the UNet a place-resolved route
# from the prompt to the layout while the latent is still noise.
POSITION_WORDS = frozenset(POSITIONS)
GROUNDED_WORDS = {"object": OBJECT_WORDS, "object+position": OBJECT_WORDS | POSITION_WORDS}


def token_owners(tokens: list[str], scene: Scene, grounded: frozenset[str] = OBJECT_WORDS) -> list[int]:
    """For each token of a caption of `scene` (tokenizer tokens, e.g. 'red</w>'), the index in scene.objects of
    the object it describes if the word is in `grounded`, else -1. A two-object caption lists its objects in either
    order around its one 'and'; the part that says 'left' is objects[0] (two-object scenes are always left +
    right)."""
    words = [t.removesuffix("</w>") for t in tokens]
    if len(scene.objects) == 1:
        return [0 if w in grounded else -1 for w in words]
    if "and" not in words:
        return [-1] * len(words)
    split = words.index("and")
    first = 0 if "left" in words[:split] else 1
    return [(first if i < split else 1 - first) if w in grounded else -1 for i, w in enumerate(words)]


def box_coverage(scene: Scene, index: int, res: int) -> torch.Tensor:
    """(res, res): the fraction of each map cell that the object's box covers."""
    offsets = scene.offsets or tuple((0, 0) for _ in scene.objects)
    cx, cy, side = object_box(scene.objects[index], offsets[index])
    edges = torch.linspace(0, IMAGE_SIZE, res + 1)
    cell = IMAGE_SIZE / res

    def overlap(lo: float, hi: float) -> torch.Tensor:
        return (torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo))).clamp(
            min=0) / cell

    return overlap(cy - side / 2, cy + side / 2)[:, None] * overlap(cx - side / 2, cx + side / 2)[None, :]


def grounding_masks(owners: list[list[int]], items: list[Scene], length: int, res: int) -> torch.Tensor:
    """(B, tokens, res*res) target masks; all-zero rows for tokens that name no object."""
    out = torch.zeros(len(items), length, res * res)
    for b, (row, scene) in enumerate(zip(owners, items)):
        boxes = {}
        for t, owner in enumerate(row[:length]):
            if owner >= 0:
                if owner not in boxes:
                    boxes[owner] = box_coverage(scene, owner, res).flatten()
                out[b, t] = boxes[owner]
    return out


def token_loss(maps: list[torch.Tensor], masks: dict[int, torch.Tensor]) -> torch.Tensor:
    """TokenCompose's L_token over the captured layers. maps: (B, heads, Q, T) attention probabilities per layer;
    masks: {Q: (B, T, Q)} from grounding_masks (at the layer's resolution)."""
    losses = []
    for probs in maps:
        target = masks.get(probs.shape[2])
        if target is None:
            continue
        a = probs.float().mean(dim=1)  # (B, Q, T)
        grounded = target.sum(dim=2) > 0  # (B, T)
        if not grounded.any():
            continue
        inside = torch.einsum("bqt,btq->bt", a, target.to(a.device))
        fraction = inside / a.sum(dim=1).clamp_min(1e-8)
        losses.append(((1 - fraction) ** 2)[grounded].mean())
    return torch.stack(losses).mean() if losses else torch.zeros(())


def object_targets(owners: list[list[int]], items: list[Scene], length: int, res: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """For the pixel loss: (B, 2, T) which tokens name object k, and (B, 2, res*res) object k's box coverage
    (all-zero for a missing object)."""
    words = torch.zeros(len(items), 2, length)
    boxes = torch.zeros(len(items), 2, res * res)
    for b, (row, scene) in enumerate(zip(owners, items)):
        for t, owner in enumerate(row[:length]):
            if owner >= 0:
                words[b, owner, t] = 1.0
        for k in range(len(scene.objects)):
            if words[b, k].any():
                boxes[b, k] = box_coverage(scene, k, res).flatten()
    return words, boxes


def pixel_loss(maps: list[torch.Tensor], targets: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """TokenCompose's L_pixel with an object's words taken together: the attention a map cell gives to object k's
    words (summed) is pushed by binary cross-entropy towards k's box coverage of the cell — inside the box a cell
    should read its own object's words (not the end-of-text/padding states, which carry every object's
    attributes at once), outside it should not read them."""
    losses = []
    for probs in maps:
        target = targets.get(probs.shape[2])
        if target is None:
            continue
        words, boxes = (x.to(probs.device) for x in target)
        present = words.sum(dim=2) > 0  # (B, 2)
        if not present.any():
            continue
        share = torch.einsum("bqt,bkt->bkq", probs.float().mean(dim=1), words).clamp(1e-6, 1 - 1e-6)
        bce = torch.nn.functional.binary_cross_entropy(share, boxes, reduction="none").mean(dim=2)
        losses.append(bce[present].mean())
    return torch.stack(losses).mean() if losses else torch.zeros(())
