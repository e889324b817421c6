"""Soundness audit: patch every position of certified images with several contents and run detect.

The "attack" content is the detector-aware attack of ``scalecert.attacks`` (PGD on the patch that
pushes M(x') and every candidate masked prediction towards one wrong label).

A *violation* is a patched image x' of a certified image (x, y) for which ``detect(x')`` returns
a label other than y without an alert. The audit is exact and cheap: ``detect(x')`` can only
return a wrong label if ``M(x') != y``, so only those x' are passed to the detector, which may
stop at its first disagreeing window (that already means an alert).
"""
from __future__ import annotations

import json

import pandas as pd
import torch
from tqdm.auto import tqdm

from .attacks import apply_patch, detector_aware_attack
from .defense import Engine

CONTENTS = ("zeros", "ones", "noise", "attack")


def patch_positions(n: int, p: int, stride: int = 1) -> torch.Tensor:
    """Return every top-left corner (a, b) of a p x p patch (stride apart, last one included)."""
    pos = list(range(0, n - p + 1, stride))
    if pos[-1] != n - p:
        pos.append(n - p)
    a, b = torch.meshgrid(torch.tensor(pos), torch.tensor(pos), indexing="ij")
    return torch.stack([a.flatten(), b.flatten()], 1)


def paste(x: torch.Tensor, patch: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """Return copies of one image x (3, n, n) with a patch (3, p, p) or patches (M, 3, p, p) at each corner."""
    return apply_patch(x.unsqueeze(0).expand(len(corners), -1, -1, -1), patch, corners)


@torch.no_grad()
def audit_image(engine: Engine, x: torch.Tensor, y: int, contents=CONTENTS, stride: int = 1,
                attack_steps: int = 5, seed: int = 0, batch: int = 256, attack_batch: int = 32,
                attack_stride: int | None = None) -> dict:
    """Return counts {cases, flipped, violations} for one certified image over positions x contents.

    ``batch`` positions are patched at once (``attack_batch`` for the gradient attack). The fixed
    contents visit every position ``stride`` apart; the attack, which costs ``attack_steps`` forward and
    backward passes per position and window, visits positions ``attack_stride`` apart (default ``stride``).
    """
    n, p = engine.n, engine.p
    g = torch.Generator().manual_seed(seed)
    cases = flipped = violations = 0
    examples = []
    for content in contents:
        corners = patch_positions(n, p, attack_stride or stride if content == "attack" else stride)
        # the attack keeps an autograd graph per (position, window): a small batch bounds its memory
        bs = attack_batch if content == "attack" else batch
        for s in range(0, len(corners), bs):
            cs = corners[s: s + bs]
            if content == "zeros":
                pt = torch.zeros(3, p, p)
            elif content == "ones":
                pt = torch.ones(3, p, p)
            elif content == "noise":
                pt = torch.rand(len(cs), 3, p, p, generator=g)
            elif content == "attack":  # detector-aware: wrong label for M(x') and every candidate M_w(x')
                xs = x.unsqueeze(0).expand(len(cs), -1, -1, -1)
                with torch.enable_grad():
                    xp, _ = detector_aware_attack(engine, xs, torch.full((len(cs),), y), cs,
                                                  steps=attack_steps, seed=seed + s, max_windows=16)
                pt = None
            else:
                raise ValueError(f"unknown patch content {content!r}: expected one of {CONTENTS}")
            if pt is not None:
                xp = paste(x, pt.to(x.device), cs.to(x.device))
            pred = engine.model(xp).argmax(1)
            wrong = (pred != y).nonzero().flatten()
            cases += len(cs)
            flipped += len(wrong)
            if len(wrong):
                recs = engine.run(xp[wrong], pred[wrong].cpu(), early_stop=True)
                for j, rec in zip(wrong.tolist(), recs):
                    if rec["certified"]:  # every candidate agrees with the wrong label: no alert
                        violations += 1
                        if len(examples) < 5:
                            examples.append({"corner": cs[j].tolist(), "content": content, "pred": rec["pred"]})
    return {"cases": cases, "flipped": flipped, "violations": violations, "examples": examples}


def audit_records(engine: Engine, images: torch.Tensor, labels: torch.Tensor, ids=None, progress: bool = True,
                  **kw) -> pd.DataFrame:
    """Return one audit row per image (id, label, certified, cases, flipped, violations, example); uncertified images get zero cases."""
    recs = engine.run(images, labels)
    rows = []
    for i, rec in enumerate(tqdm(recs, disable=not progress, desc=f"audit {engine.mode}")):
        row = {"id": int(ids[i]) if ids is not None else i, "label": int(labels[i]), "certified": bool(rec["certified"]),
               "cases": 0, "flipped": 0, "violations": 0, "example": ""}
        if rec["certified"]:
            r = audit_image(engine, images[i].to(engine.device), int(labels[i]), **kw)
            row.update({k: r[k] for k in ("cases", "flipped", "violations")})
            row["example"] = json.dumps(r["examples"][0]) if r["examples"] else ""
        rows.append(row)
    return pd.DataFrame(rows)


def audit(engine: Engine, images: torch.Tensor, labels: torch.Tensor, progress: bool = True, **kw) -> dict:
    """Return audit totals over the images that ``engine`` certifies (others are skipped)."""
    df = audit_records(engine, images, labels, progress=progress, **kw)
    total = {"images": len(df), "certified": int(df.certified.sum())}
    total.update({k: int(df[k].sum()) for k in ("cases", "flipped", "violations")})
    total["examples"] = [dict(json.loads(e), image=i) for i, e in zip(df.id, df.example) if e]
    return total
