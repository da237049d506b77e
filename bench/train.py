"""Pretraining throughput: the data pipeline's overhead over a bare training loop, and
Mamba-2 against Llama at equal parameter count as the context grows.

1. End to end (`client.loop.fit` on packed blocks of a tokenized site: DataLoader,
   collation, EHR embeddings, scheduler, clipping) versus a bare forward/backward/step
   loop on random tokens of the same shape, same model, same process; alternated per
   repeat. Overhead = 1 - end-to-end / bare (aim: under 10%).
2. Mamba-2 and Llama (Llama's MLP width solved so both have the same parameter count)
   at each context, the same tokens per step; each run in a fresh process, so its peak
   memory (RSS on CPU, allocated on CUDA) is its own. On CUDA with the `cuda` extra,
   transformers uses the mamba-ssm kernels.
3. The pretraining objectives (shared/model/objectives.py): tokens/s of each objective added
   to next-token prediction on stay views, against next-token alone (packed blocks, and
   stay views), same model size, same process, alternated per repeat.

    python -m bench.train                                    # contexts 512 2048 8192
    python -m bench.train --contexts 128 256 --steps 2 --repeats 1 --size tiny \
        --step-tokens 1024                                   # quick
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.measure import measure, tokenized_demo


def _model(arch: str, size: str, tok, llama_mlp: int | None = None):
    from fedclif.shared.config import load_config
    from fedclif.shared.model.models import build_model, quiet_transformers

    quiet_transformers()
    o = [f"arch={arch}"] + ([f"shapes.llama.intermediate_size={llama_mlp}"] if llama_mlp else [])
    return build_model(load_config(f"model/{size}", overrides=o), tok)


def equal_llama_mlp(size: str, tok) -> int:
    """Llama MLP width giving Llama the parameter count of Mamba-2 (count is linear in it)."""
    from fedclif.shared.model.models import n_params

    target = n_params(_model("mamba2", size, tok))
    a, b = (n_params(_model("llama", size, tok, w)) for w in (64, 128))
    return max(8, round((64 + (target - a) * 64 / (b - a)) / 8) * 8)


def random_batch(batch: int, context: int, vocab: int, device) -> dict:
    """Random tokens with every input the model takes, already on `device`."""
    import torch

    g = torch.Generator().manual_seed(0)
    shape = (batch, context)
    rnd = {
        "input_ids": torch.randint(3, vocab, shape, generator=g),
        "types": torch.randint(0, 5, shape, generator=g),
        "hours": torch.rand(shape, generator=g) * 24,
        "age": torch.full(shape, 60.0),
        "visit": torch.zeros(shape, dtype=torch.long),
    }
    return {k: v.to(device) for k, v in rnd.items()}


def _bare_and_e2e(
    tokens: Path, size: str, context: int, batch: int, steps: int, bare_first: bool
) -> dict:
    import torch

    from fedclif.client.loop import fit, pick_device
    from fedclif.client.stage import STAGES
    from fedclif.shared.config import load_config
    from fedclif.shared.model.models import seed_everything
    from fedclif.shared.model.sequences import load_site_data

    cfg = load_config(
        "train",
        overrides=[
            f"pretrain.context={context}",
            f"pretrain.batch_size={batch}",
            f"pretrain.max_steps={steps}",
            "pretrain.eval_every=0",
        ],
    )
    device = pick_device(cfg.device)
    data = load_site_data(tokens, cfg.split, full=True)
    st = STAGES["pretrain"]
    blocks = st.examples(data, "train", cfg)
    seed_everything(0)
    model = _model("mamba2", size, data.tok).to(device)
    model.head.requires_grad_(False)
    rnd = random_batch(batch, context, len(data.tok.vocab), device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def bare_loop(n: int) -> None:
        for _ in range(n):
            model(rnd).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def end_to_end(_: int) -> None:
        fit(model, st.loss_for(blocks), blocks, st.collate(model), cfg.pretrain, device)

    bare_loop(1)  # warm-up: first-call allocations land in neither timing
    order = [("bare", bare_loop), ("e2e", end_to_end)]
    rates = {}
    for name, fn in order if bare_first else order[::-1]:
        _sync(device)
        t0 = time.perf_counter()
        fn(steps)
        _sync(device)
        rates[name] = steps * batch * context / (time.perf_counter() - t0)
    return rates


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


OBJECTIVE_SETS = {
    "next_token (packed blocks)": {"next_token": 1.0},
    "next_token (stay views)": None,  # next-token alone on one stay per example
    "+ ts_align": {"next_token": 1.0, "ts_align": 1.0},
    "+ ts_recon": {"next_token": 1.0, "ts_recon": 1.0},
    "+ stay_recon": {"next_token": 1.0, "stay_recon": 1.0},
    "+ masked_codes": {"next_token": 1.0, "masked_codes": 1.0},
    "+ code_contrast": {"next_token": 1.0, "code_contrast": 1.0},
}


def _objective_rates(
    tokens: Path, size: str, context: int, batch: int, steps: int, only: list[str]
) -> dict:
    """Real (non-padding) input tokens per second of a training step, per objective set
    (next-token alone and the sets adding an objective in `only`)."""
    import torch
    from torch.utils.data import DataLoader

    from fedclif.client.stage import STAGES
    from fedclif.shared.config import load_config
    from fedclif.shared.model.models import build_model, quiet_transformers, setup
    from fedclif.shared.model.objectives import Spec
    from fedclif.shared.model.sequences import StayViews, load_site_data

    quiet_transformers()
    st, rates = STAGES["pretrain"], {}
    for name, weights in OBJECTIVE_SETS.items():
        if name.startswith("+ ") and name[2:] not in only:
            continue
        over = [f"pretrain.context={context}", f"pretrain.batch_size={batch}"]
        over += [f"pretrain.objectives.{k}={v}" for k, v in (weights or {}).items()]
        cfg = load_config("train", overrides=over)
        data = load_site_data(tokens, cfg.split, full=True)
        torch.manual_seed(0)
        model = build_model(load_config(f"model/{size}"), data.tok, cfg.pretrain)
        setup(model, cfg, "pretrain")
        if weights is None:  # next-token loss alone, on one stay per example
            spec = Spec.of(cfg.pretrain, {"next_token": 1.0})
            ds = StayViews(data, "train", context, int(cfg.pretrain.ts.hours), spec)
        else:
            ds = st.examples(data, "train", cfg)
        loss_fn = st.loss_for(ds)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        loader = DataLoader(
            ds,
            batch_size=batch,
            shuffle=True,
            collate_fn=st.collate(model),
            generator=torch.Generator().manual_seed(0),
        )
        pad, n, t0 = model.lm.config.pad_token_id, 0, None
        for i, b in enumerate(loader):
            if i == 1:  # the first step warms up
                t0 = time.perf_counter()
            loss_fn(model, b).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 1:
                n += int((b["input_ids"] != pad).sum())
            if i == steps:
                break
        rates[name] = n / (time.perf_counter() - t0)
    return rates


def _arch_run(
    arch: str, size: str, mlp: int, tokens: Path, context: int, batch: int, steps: int
) -> tuple[float, float | None, int]:
    """(tokens/s after one warm-up step, CUDA peak MiB or None, parameters)."""
    import torch

    from fedclif.client.loop import pick_device
    from fedclif.shared.model.models import n_params
    from fedclif.shared.tokens.tokenizer import Tokenizer

    tok = Tokenizer.load(tokens / "tokenizer.json")
    device = pick_device("auto")
    torch.manual_seed(0)
    model = _model(arch, size, tok, mlp if arch == "llama" else None).to(device)
    batch_ = random_batch(batch, context, len(tok.vocab), device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    for i in range(steps + 1):
        if i == 1:
            _sync(device)
            t0 = time.perf_counter()
        with ctx:
            loss = model(batch_)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    rate = steps * batch * context / (time.perf_counter() - t0)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return rate, gpu, n_params(model)


def _null():
    from contextlib import nullcontext

    return nullcontext()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", help="model size in configs/model/")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--repeats", type=int, default=3)
    every = [n[2:] for n in OBJECTIVE_SETS if n.startswith("+ ")]
    ap.add_argument(
        "--objectives",
        nargs="*",
        default=every,
        choices=every,
        help="objectives whose cost section 3 measures (default: all)",
    )
    ap.add_argument(
        "--step-tokens", type=int, default=8192, help="tokens per step in the comparison"
    )
    args = ap.parse_args()
    import torch

    from fedclif.shared.tokens.tokenizer import Tokenizer

    cuda = torch.cuda.is_available()
    kernels = "-"
    if cuda:
        from transformers.utils.import_utils import is_mamba_2_ssm_available

        kernels = "mamba-ssm kernels" if is_mamba_2_ssm_available() else "PyTorch path"
    print(
        f"device: {'cuda ' + torch.cuda.get_device_name() if cuda else 'cpu'}; "
        f"Mamba-2 path: {kernels if cuda else 'PyTorch (CPU)'}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokens = tokenized_demo(Path(tmp))
        tok = Tokenizer.load(tokens / "tokenizer.json")

        ctx0, batch0 = min(args.contexts), max(args.step_tokens // max(args.contexts), 1)
        runs = [
            _bare_and_e2e(
                tokens,
                args.size,
                ctx0,
                max(args.step_tokens // 2 // ctx0, 1),
                args.steps + 2,
                i % 2,
            )
            for i in range(args.repeats)
        ]
        e2e = statistics.median(r["e2e"] for r in runs)
        bare = statistics.median(r["bare"] for r in runs)
        print(
            f"\n1. pipeline overhead ({args.size} mamba2, context {ctx0}, median of {args.repeats})"
        )
        print(f"   bare loop on random tokens  {bare:10,.0f} tokens/s")
        print(f"   end to end (fit + loader)   {e2e:10,.0f} tokens/s")
        print(f"   overhead                    {100 * (1 - e2e / bare):9.1f} %  (aim < 10%)")

        mlp = equal_llama_mlp(args.size, tok)
        tokens_per_step = max(args.contexts) * batch0
        print(
            f"\n2. mamba2 vs llama ({args.size}; llama intermediate_size={mlp} for equal "
            f"parameters; {tokens_per_step:,} tokens per step; median of {args.repeats})"
        )
        mem = "peak CUDA MiB" if cuda else "peak RSS MiB"
        print(
            f"   {'context':>7} {'mamba2 tok/s':>13} {'llama tok/s':>12} {'ratio':>6}  "
            f"{'mamba2 ' + mem:>20} {'llama ' + mem:>19}"
        )
        for ctx in args.contexts:
            batch = max(tokens_per_step // ctx, 1)
            row = {}
            for arch in ("mamba2", "llama"):
                rs = [
                    measure(_arch_run, arch, args.size, mlp, tokens, ctx, batch, args.steps)
                    for _ in range(args.repeats)
                ]
                rate = statistics.median(r[2][0] for r in rs)
                peak = max((r[2][1] if cuda else r[1]) for r in rs)
                row[arch] = (rate, peak, rs[0][2][2])
            (mr, mp_, mn), (lr, lp, ln) = row["mamba2"], row["llama"]
            print(f"   {ctx:7d} {mr:13,.0f} {lr:12,.0f} {mr / lr:6.2f}  {mp_:20,.0f} {lp:19,.0f}")
        print(f"   parameters: mamba2 {mn:,}, llama {ln:,}")

        runs = [
            _objective_rates(tokens, args.size, ctx0, batch0, args.steps + 2, args.objectives)
            for _ in range(args.repeats)
        ]
        print(
            f"\n3. pretraining objectives ({args.size} mamba2, context {ctx0}, batch "
            f"{batch0}; real input tokens/s, median of {args.repeats})"
        )
        base = statistics.median(r["next_token (packed blocks)"] for r in runs)
        views = statistics.median(r["next_token (stay views)"] for r in runs)
        print(f"   {'objectives':<28} {'tokens/s':>10} {'vs packed':>10} {'vs stay views':>14}")
        for name in runs[0]:
            rate = statistics.median(r[name] for r in runs)
            print(f"   {name:<28} {rate:10,.0f} {rate / base:10.2f} {rate / views:14.2f}")


if __name__ == "__main__":
    main()
