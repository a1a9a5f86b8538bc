# ruff: noqa: E501, E741, B023 -- an ablation harness: one-off formulas kept as written
"""The levers tried for `hetvit fit`, one run per setting, on a small proxy budget.

Each run compresses the committed CIFAR-10 teacher with a plan, calibrates it on 256 training
images, optionally applies one lever, distils it from the teacher on ``--ntrain`` unlabeled
training images for ``--passes`` passes, and prints top-1 on ``--ntest`` test images (a seeded
random subset). ``docs/fitting.md`` ("Levers on a proxy budget") lists what each lever gave
(the proxy: 1,024 images, 8 passes, 2,000 test images). Levers:

- ``--cf raw|simplex``: closed-form static maps, per head ``S = (C + l A_mean)(G + l I)^-1``
  with ``G = sum V V^T`` and ``C = sum (A V_teacher) V^T`` over the images, fitted layer by
  layer on the student's own inputs (``raw`` keeps S as it is, ``simplex`` projects its rows);
- ``--agg cluster``: pyramid started from k-means of the tokens instead of pooling;
- ``--content``: content-aware aggregation ``softmax(W + Q LN(X)^T) X`` (PatchMerger-style
  queries on top of the static logits, starting at zero);
- ``--mixup A``, ``--crop P``, ``--lr``, ``--bs``, ``--feat W`` (token distillation at the
  end of each pyramid stage), ``--only-new`` (train only the new parameters).

    .venv/bin/python benchmarks/fit_levers.py --ntrain 1024 --passes 8 --ntest 2000 --mixup 1.0

The first run caches the images it reads as tensors under ``--cache`` (default
``/tmp/hetvit-fit-levers``).
"""

import argparse
import dataclasses
import json
import math
import os
import time

import torch
import torch.nn.functional as F

import hetvit
from hetvit.aggregation import TokenAggregation
from hetvit.attention import StaticAttention
from hetvit.distill import aggregation_path, kd_loss
from hetvit.hosts import host_of
from hetvit.plan import Plan
from hetvit.surgery import preset as surgery_preset

p = argparse.ArgumentParser()
p.add_argument("--plan", default="fast")
p.add_argument("--cf", default="none")  # none|raw|simplex
p.add_argument("--ridge", type=float, default=0.1)
p.add_argument("--agg", default="pool")
p.add_argument("--passes", type=int, default=0)
p.add_argument("--lr", type=float, default=3e-4)
p.add_argument("--lr-new", type=float, default=5e-2)
p.add_argument("--mixup", type=float, default=0.0)
p.add_argument("--crop", type=int, default=0)
p.add_argument("--feat", type=float, default=0.0)
p.add_argument("--only-new", action="store_true")
p.add_argument("--bs", type=int, default=64)
p.add_argument("--ntest", type=int, default=3000)
p.add_argument("--ntrain", type=int, default=2048)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--T", type=float, default=1.0)
p.add_argument("--tag", default="")
p.add_argument("--content", action="store_true")
p.add_argument("--cache", default="/tmp/hetvit-fit-levers")
p.add_argument(
    "--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

_orig = StaticAttention.static_map


def static_map(self: StaticAttention) -> torch.Tensor:
    if getattr(self, "raw", False):
        return self.logits
    return _orig(self)


StaticAttention.static_map = static_map

teacher = hetvit.load(
    os.path.join(os.path.dirname(__file__), "..", "assets", "cifar10-teacher")
).eval()


def cached(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` of a seeded random draw of a CIFAR-10 split, eval transform, as tensors."""
    from hetvit.data import make_loader, make_transform, open_dataset, random_subset

    path = os.path.join(a.cache, f"{split}{n}.pt")
    if not os.path.exists(path):
        ds = open_dataset(os.path.join(a.data, f"cifar10-{split}.tar.gz"), make_transform(teacher))
        sub = random_subset(ds, n, seed=0) if n < len(ds) else ds
        xs, ys = zip(*[(x, y) for x, y in make_loader(sub, batch_size=256)], strict=False)
        os.makedirs(a.cache, exist_ok=True)
        torch.save((torch.cat(xs), torch.cat(ys)), path)
    return torch.load(path)


xtr, _ = cached("train", 2048)
xtr = xtr[: a.ntrain]
xte, yte = cached("test", 10000)
perm_te = torch.randperm(len(xte), generator=torch.Generator().manual_seed(0))[: a.ntest]
xte, yte = xte[perm_te], yte[perm_te]


@torch.no_grad()
def acc(m: torch.nn.Module) -> float:
    m.eval()
    c = 0
    for i in range(0, len(xte), 500):
        c += (m(xte[i : i + 500]).argmax(-1) == yte[i : i + 500]).sum().item()
    return 100 * c / len(xte)


if a.plan.startswith("{"):
    plan = Plan.from_dict(json.loads(a.plan))
elif a.plan in ("fast", "balanced", "fastest"):
    plan = surgery_preset(a.plan, teacher)
else:  # "s0,1,2|3:32,6:16"
    st, py = a.plan.split("|")
    plan = Plan(
        static=[int(s) for s in st.split(",") if s],
        pyramid=[tuple(map(int, s.split(":"))) for s in py.split(",") if s],
    )
if a.content:
    plan = dataclasses.replace(plan, aggregation="content")
t0 = time.time()
student = hetvit.compress(teacher, plan, calibration=xtr[:256], aggregation_init=a.agg)


print("plan", plan.describe(), "calib", round(acc(student), 2), flush=True)


def layer_blocks(m: torch.nn.Module) -> list[torch.nn.Module]:
    return [b for b in m.blocks if not isinstance(b, TokenAggregation)]


@torch.no_grad()
def closed_form(student: torch.nn.Module, raw: bool = True, ridge: float = 0.1) -> None:
    prefix = 1
    sb, tb = layer_blocks(student), layer_blocks(teacher)
    student.eval()
    for l in plan.static:
        path = aggregation_path(student)[l]
        sat = sb[l].attn
        H, dh = sat.num_heads, sat.head_dim
        N = sat.num_tokens
        G = torch.zeros(H, N, N, dtype=torch.float64)
        C = torch.zeros_like(G)
        cap = {}
        h1 = sb[l].attn.register_forward_pre_hook(lambda mod, args: cap.__setitem__("s", args[0]))
        h2 = tb[l].attn.register_forward_pre_hook(lambda mod, args: cap.__setitem__("t", args[0]))
        for i in range(0, len(xtr), 256):
            x = xtr[i : i + 256]
            student.forward_features(x)
            teacher.forward_features(x)
            xs, xt = cap["s"], cap["t"]
            tat = tb[l].attn
            A = host_of(teacher).attention_map(tat, xt)  # B H Nt Nt
            D = tat.qkv.out_features // 3
            vt = tat.qkv(xt)[..., 2 * D :].reshape(xt.shape[0], xt.shape[1], H, dh).transpose(1, 2)
            T = A @ vt  # B H Nt dh
            if path is not None:
                T = torch.cat([T[:, :, :prefix], path @ T[:, :, prefix:]], 2)
            vs = sat.v(xs).reshape(xs.shape[0], N, H, dh).transpose(1, 2)
            G += torch.einsum("bhnd,bhmd->hnm", vs, vs).double()
            C += torch.einsum("bhnd,bhmd->hnm", T, vs).double()
        h1.remove()
        h2.remove()
        mean = sat.static_map().double()
        lam = ridge * G.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None]
        S = torch.linalg.solve(
            (G + lam * torch.eye(N, dtype=G.dtype)).transpose(1, 2),
            (C + lam * mean).transpose(1, 2),
        ).transpose(1, 2)
        if raw:
            sat.raw = True
            with torch.no_grad():
                sat.logits.copy_(S.float())
        else:
            S = project_simplex(S)
            sat.set_map(S.float())
        sat._cache = None
        print(
            f"  cf layer {l}: acc {acc(student):.2f}  row-sum {S.sum(-1).mean():.3f} neg {(S < 0).float().mean():.3f}",
            flush=True,
        )


def project_simplex(S: torch.Tensor) -> torch.Tensor:
    # Euclidean projection of each row onto the probability simplex
    u, _ = torch.sort(S, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    k = torch.arange(1, S.shape[-1] + 1, dtype=S.dtype)
    cond = u - css / k > 0
    rho = cond.sum(-1, keepdim=True)
    theta = css.gather(-1, rho - 1) / rho
    return (S - theta).clamp_min(0)


if a.cf != "none":
    closed_form(student, raw=(a.cf == "raw"), ridge=a.ridge)
    print("closed-form", a.cf, round(acc(student), 2), f"{time.time() - t0:.0f}s", flush=True)


def augment(x: torch.Tensor) -> torch.Tensor:
    if a.crop:
        x.shape[0]
        pad = a.crop
        xp = F.pad(x, (pad,) * 4, mode="reflect")
        i, j = torch.randint(0, 2 * pad + 1, (2,))
        x = xp[:, :, i : i + 32, j : j + 32]
    flip = torch.rand(x.shape[0]) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if a.mixup > 0:
        lam = torch.distributions.Beta(a.mixup, a.mixup).sample((x.shape[0], 1, 1, 1))
        x = lam * x + (1 - lam) * x[torch.randperm(x.shape[0])]
    return x


if a.passes:
    new = [
        p_
        for n, p_ in student.named_parameters()
        if n.endswith("logits")
        or n.endswith(".weight")
        and "blocks" in n
        and isinstance(dict(student.named_modules())[n.rsplit(".", 1)[0]], TokenAggregation)
        or n.endswith(".query")
    ]
    new_ids = {id(q) for q in new}
    raw_ids = {
        id(m.logits)
        for m in student.modules()
        if isinstance(m, StaticAttention) and getattr(m, "raw", False)
    }
    qids = {id(q_) for n_, q_ in student.named_parameters() if n_.endswith(".query")}
    raw_ids = raw_ids
    groups = [
        {
            "params": [q for q in new if id(q) not in raw_ids and id(q) not in qids],
            "lr": a.lr_new,
            "weight_decay": 0.0,
        },
        {"params": [q for q in new if id(q) in qids], "lr": 3e-3, "weight_decay": 0.0},
        {"params": [q for q in new if id(q) in raw_ids], "lr": a.lr, "weight_decay": 0.0},
    ]
    if not a.only_new:
        groups.append(
            {
                "params": [q for q in student.parameters() if id(q) not in new_ids],
                "lr": a.lr,
                "weight_decay": 0.0,
            }
        )
    else:
        for q in student.parameters():
            if id(q) not in new_ids:
                q.requires_grad_(False)
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups)
    steps = a.passes * math.ceil(len(xtr) / a.bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.1
    )
    step = 0
    for ep in range(a.passes):
        student.train()
        perm = torch.randperm(len(xtr))
        tot = 0
        for i in range(0, len(xtr), a.bs):
            x = augment(xtr[perm[i : i + a.bs]])
            if a.feat > 0:
                from hetvit.capture import capture_outputs
                from hetvit.distill import feature_loss, stage_ends

                ends = stage_ends(plan, 12)
                tblk = layer_blocks(teacher)
                sblk = layer_blocks(student)
                with torch.no_grad(), capture_outputs([tblk[e] for e in ends]) as tf:
                    tl = teacher(x)
                with capture_outputs([sblk[e] for e in ends]) as sf:
                    sl = student(x)
                paths = aggregation_path(student)
                loss = kd_loss(sl, tl, a.T) + a.feat * sum(
                    feature_loss(s_, t_, paths[e], 1) for s_, t_, e in zip(sf, tf, ends, strict=False)
                ) / len(ends)
            else:
                with torch.no_grad():
                    tl = teacher(x)
                sl = student(x)
                loss = kd_loss(sl, tl, a.T)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            tot += loss.item()
        if ep == a.passes - 1:
            print(
                f"  pass {ep + 1} loss {tot / math.ceil(len(xtr) / a.bs):.4f} acc {acc(student):.2f} {time.time() - t0:.0f}s",
                flush=True,
            )
print(
    "RESULT",
    a.tag,
    json.dumps(vars(a)),
    "acc",
    round(acc(student), 2),
    "time",
    round(time.time() - t0),
    flush=True,
)
