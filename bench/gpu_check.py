"""The record path's speed on this machine against the 1.0611 record's figures; scripts/gpu_check.sh runs it.

    python bench/gpu_check.py data DIR                    # synthetic shards (when the preset's data is absent)
    torchrun --nproc_per_node=N bench/gpu_check.py train  # ms/step, tokens/s/GPU, peak memory, MFU, export s
    python bench/gpu_check.py kernels                     # fused vs reference training kernels (CUDA)
    python bench/gpu_check.py verdict DIR                 # reads DIR/*.log: the summary and the verdict line

`train` builds PRESET (record) at its plain init (ORTHO_INIT=0: its QR takes minutes and speed does not
depend on the weights), compiles both looping states on WARMUP steps, then times STEPS steps in each state
and exports the live weights the way a run does (Hessians on training batches, GPTQ, LQER, the coder). The
record spends 35% of its wallclock unlooped (ENABLE_LOOPING_AT), so its rate is 0.35 r_off + 0.65 r_on.
MFU counts the matmuls and the attention of each state (bench/flops.py) at the batches' own document
lengths, against the GPU's dense bf16 peak (GPU_PEAK_TFLOPS overrides the table). Every figure is a
measurement on this machine except the `projected_8x` ones, which assume perfect scaling over 8 ranks.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.flops import forward_flops_per_token  # noqa: E402
from shared.config import Hyperparameters  # noqa: E402
from shared.data import list_shards, train_pattern, write_shard  # noqa: E402
from shared.segments import cu_seqlens, segment_ids  # noqa: E402

# The 1.0611 record on 8xH100 (RECORD_STACK.md §0, §5.5, §5.7, §9)
RECORD = dict(ms_per_step=121.7, ms_unlooped=96.0, ms_looped=139.0, batch_tokens=786_432, gpus=8,
              peak_gib=41.7 * 1e9 / 2**30, ttt_eval_s=(455.1, 509.0), export_s=4.7 + 100.0)
RECORD["tokens_per_s_gpu"] = RECORD["batch_tokens"] / (RECORD["ms_per_step"] / 1000) / RECORD["gpus"]
TTT_TARGET_S = 500.0  # our bar for the phased TTT evaluation on 8xH100 (the record: 455-509 s)
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0,
                    "L40S": 362.0, "B200": 2250.0, "GH200": 989.4}  # dense, vendor datasheets
BOS = 1  # the record's tokenizers' BOS, and the synthetic documents'
SYNTH_MEAN_TOKENS = 47_851_520 / 50_000  # the validation split's mean document (RECORD_STACK.md §1)


# ---- synthetic data ----
def write_synthetic_shards(out: str, vocab_size: int, tokens: int, seed: int = 0) -> None:
    """One train shard of random documents (BOS, then lognormal(sigma 1) tokens of the split's mean length)."""
    rng = np.random.default_rng(seed)
    mu = np.log(SYNTH_MEAN_TOKENS) - 0.5
    stream = rng.integers(2, vocab_size, tokens, dtype=np.int64)
    starts = np.cumsum(np.maximum(1, rng.lognormal(mu, 1.0, tokens // 64)).astype(np.int64) + 1)
    stream[np.concatenate([[0], starts[starts < tokens]])] = BOS
    os.makedirs(out, exist_ok=True)
    write_shard(os.path.join(out, "fineweb_train_000000.bin"), stream)


def mean_context(x: np.ndarray, seq_len: int) -> float:
    """Mean keys a query attends to under document isolation: sum over segments of L(L+1)/2, per token."""
    lengths = np.diff(cu_seqlens(segment_ids(x, BOS, seq_len))).astype(np.float64)
    return float((lengths * (lengths + 1) / 2).sum() / lengths.sum())


# ---- the train stage ----
def check_config(env: dict) -> tuple[Hyperparameters, str]:
    """PRESET's config; its data when the train shards exist, else GPU_CHECK_SYNTHETIC's shards."""
    cfg = Hyperparameters.from_env(dict(env, PRESET=env.get("PRESET", "record")))
    cfg = dataclasses.replace(cfg, ortho_init=False, max_wallclock_seconds=0.0, val_loss_every=0)
    if glob.glob(train_pattern(cfg.data_path)):
        return cfg, "dataset"
    synthetic = env.get("GPU_CHECK_SYNTHETIC", "")
    if not synthetic:
        raise SystemExit(f"no train shards at {cfg.data_path} and GPU_CHECK_SYNTHETIC is unset")
    return dataclasses.replace(cfg, data_path=synthetic), "synthetic"


def peak_tflops(be) -> float | None:
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"])
    if be.device.type != "cuda":
        return None
    import torch
    name = torch.cuda.get_device_name(be.device)
    hits = [v for k, v in sorted(BF16_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name]
    return hits[0] if hits else None


def time_steps(be, st, cfg, looping: bool, steps: int) -> tuple[float, float]:
    """Seconds per optimizer step and the mean document context of those steps' batches."""
    from shared.loop import one_step
    be.set_looping(looping)
    be.sync()
    ctx, t0 = [], time.perf_counter()
    for _ in range(steps):
        one_step(be, st, cfg, 1.0)
    be.sync()
    dt = (time.perf_counter() - t0) / steps
    for _ in range(2):  # the context of the same kind of batch, after the clock
        ctx.append(mean_context(st.loader.next_micro_batch(cfg.train_batch_tokens, cfg.train_seq_len)[0],
                                cfg.train_seq_len))
    return dt, float(np.mean(ctx))


def compile_states(be, st, cfg, states: tuple[bool, ...], warmup: int) -> float:
    """WARMUP steps per looping state (compile, autotune, caches): seconds, untimed in a real run."""
    from shared.loop import one_step
    t0 = time.perf_counter()
    for looping in states:
        be.set_looping(looping)
        for _ in range(warmup):
            one_step(be, st, cfg, 1.0)
    be.sync()
    return time.perf_counter() - t0


def graph_breaks() -> int:
    """Graph breaks dynamo met so far (each splits the compiled step and may hide a host sync)."""
    from torch._dynamo.utils import counters
    return sum(counters["graph_break"].values())


def flops_per_token(cfg: Hyperparameters, looping: bool, context: float) -> float:
    fwd = forward_flops_per_token(cfg, context, looping)
    return 3.0 * (fwd["matmul"] + fwd["head"] + fwd["attention"])


def profile_step(be, st, cfg, rows: int = 30) -> None:
    """The costliest CUDA kernels of one looped step (where the next speed-up is)."""
    import torch
    from shared.loop import one_step
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        one_step(be, st, cfg, 1.0)
        be.sync()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=160),
          flush=True)


def export_seconds(be, st, cfg, out: str) -> float:
    from shared import loop
    from shared.runlog import RunLog
    cfg = dataclasses.replace(cfg, artifact_path=os.path.join(out, "gpu_check_artifact.bin"), run_id="gpu_check")
    t0 = time.perf_counter()
    loop.export(be, cfg, "0" * 64, st.loader, RunLog(cfg.run_id, enabled=be.rank == 0, log_dir=out))
    return time.perf_counter() - t0


def train_stage(args) -> None:
    import cuda_train
    from shared.data import TokenLoader
    from shared.loop import TrainState
    from shared.spec import init_params
    cfg, data = check_config(dict(os.environ))
    be = cuda_train.TorchBackend(cfg)
    be.build(cfg, init_params(cfg), train=True, bos_id=BOS)
    if cfg.ema_decay > 0:
        be.load_ema(be.weights())
    st = TrainState(0, 0.0, TokenLoader(train_pattern(cfg.data_path), be.rank, be.world_size, cfg.vocab_size))
    say = print if be.rank == 0 else (lambda *a, **k: None)
    say(f"gpu_check backend:{be.describe()} preset:{os.environ.get('PRESET', 'record')} data:{data}", flush=True)
    states = (False, True) if cfg.num_loops > 0 else (False,)
    states = states[-1:] if args.states == "looped" else states
    compile_s = compile_states(be, st, cfg, states, args.warmup)
    say(f"gpu_check_compile seconds:{compile_s:.1f} graph_breaks:{graph_breaks()}", flush=True)
    timed = {}
    for looping in states:  # each printed as soon as it is known
        timed[looping] = time_steps(be, st, cfg, looping, args.steps)
        say(f"gpu_check_state looping:{int(looping)} ms_per_step:{1000 * timed[looping][0]:.1f}", flush=True)
    if be.device.type == "cuda" and be.rank == 0 and args.profile:
        profile_step(be, st, cfg)
    peak = be.peak_memory_line()
    export_s = export_seconds(be, st, cfg, args.work) if args.export else None
    say(train_line(cfg, be, timed, compile_s, export_s, peak_tflops(be)), flush=True)
    say(f"gpu_check_memory {peak}", flush=True)
    be.finish()


def train_line(cfg, be, timed: dict, compile_s: float, export_s: float, peak: float | None) -> str:
    """The train stage's figures; with one looping state timed (--states looped, or no NUM_LOOPS) the record's
    mix cannot be formed unless that state is the whole run, and its figures are `n/a`."""
    rate = {k: cfg.train_batch_tokens / s / be.world_size for k, (s, _) in timed.items()}
    looped = cfg.num_loops > 0
    shares = {False: cfg.enable_looping_at, True: 1 - cfg.enable_looping_at} if looped else {False: 1.0}
    whole = set(shares) <= set(rate)  # every state of a run was timed
    mixed = sum(shares[k] * rate[k] for k in shares) if whole else None
    flops = sum(shares[k] * rate[k] * flops_per_token(cfg, k, timed[k][1]) for k in shares) if whole else None
    fmt = (lambda v, f: "n/a" if v is None else f.format(v))
    ms = {k: 1000 * s for k, (s, _) in timed.items()}
    return (f"gpu_check_train world:{be.world_size} batch_tokens:{cfg.train_batch_tokens} "
            f"ms_per_step_unlooped:{fmt(ms.get(False), '{:.1f}')} ms_per_step_looped:{fmt(ms.get(True), '{:.1f}')} "
            f"tokens_per_s_gpu_unlooped:{fmt(rate.get(False), '{:.0f}')} "
            f"tokens_per_s_gpu_looped:{fmt(rate.get(True), '{:.0f}')} tokens_per_s_gpu:{fmt(mixed, '{:.0f}')} "
            f"projected_8x_ms_per_step:{fmt(mixed and cfg.train_batch_tokens / RECORD['gpus'] / mixed * 1000, '{:.1f}')} "
            f"mfu_pct:{fmt(flops and peak and 100 * flops / (peak * 1e12), '{:.1f}')} peak_tflops:{peak or 'n/a'} "
            f"context:{next(iter(timed.values()))[1]:.0f} compile_s:{compile_s:.1f} export_s:{fmt(export_s, '{:.1f}')}")


# ---- fused kernels against their references (CUDA) ----
def bench(fn, *args, reps: int = 10) -> float:
    import torch
    for _ in range(2):
        fn(*args)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1000


def kernels_stage(args) -> None:
    """ms of forward + backward of one record micro-batch (98,304 tokens) through the training loss and one MLP,
    compiled, fused path against the reference ops: which one the TORCH_FUSED_* defaults should pick."""
    import torch
    import torch.nn.functional as F
    import torch_model as tm
    if not torch.cuda.is_available():
        print("gpu_check_kernels skipped: no CUDA device", flush=True)
        return
    dev, bf = torch.device("cuda"), torch.bfloat16
    n, v, d, h = args.kernel_tokens, 8192, 512, 2048
    z = (torch.randn(n, v, device=dev) * 10).to(bf).requires_grad_(True)
    y = torch.randint(0, v, (n,), device=dev)
    x = torch.randn(n, d, device=dev, dtype=bf, requires_grad=True)
    w1 = (torch.randn(h, d, device=dev) / 23).to(bf).requires_grad_(True)
    w2 = (torch.randn(d, h, device=dev) / 45).to(bf).requires_grad_(True)
    cases = {
        "ce_reference": (lambda: F.cross_entropy(30 * torch.tanh(z.float() / 30), y).backward()),
        "ce_fused": (lambda: tm.SoftcapCrossEntropy.apply(z, y, 30.0).mean().backward()),
        "mlp_reference": (lambda: F.linear(F.leaky_relu(F.linear(x, w1), 0.5).square(), w2).float().sum().backward()),
        "mlp_fused": (lambda: tm.FusedSquaredMLP.apply(x, w1, w2, 0.5).float().sum().backward()),
    }
    out = []
    for name, fn in cases.items():
        out.append(f"{name}_ms:{bench(torch.compile(fn)):.3f}")
        print(f"gpu_check_kernel {out[-1]}", flush=True)
    print("gpu_check_kernels tokens:%d %s" % (n, " ".join(out)), flush=True)


# ---- the verdict ----
def parse_fields(text: str, prefix: str) -> dict[str, str]:
    """key:value pairs of the last line starting with `prefix`."""
    lines = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    return dict(re.findall(r"(\S+?):(\S+)", lines[-1])) if lines else {}


def num(fields: dict, key: str) -> float | None:
    try:
        return float(fields[key])
    except (KeyError, ValueError):
        return None


def verdict_lines(train: dict, ttt: dict, peak_mib: float | None) -> list[str]:
    """One `name:ours/record:ok|BEHIND` (or `name:n/a`) item per figure, then the verdict line."""
    items = []

    def item(name, ours, record, fmt, good):
        if ours is None:
            items.append(f"{name}:n/a")
        else:
            items.append(f"{name}:{fmt.format(ours)}/{fmt.format(record)}:{'ok' if good(ours) else 'BEHIND'}")

    rate = num(train, "tokens_per_s_gpu")
    item("tokens_per_s_gpu", rate, RECORD["tokens_per_s_gpu"], "{:.0f}", lambda r: r >= RECORD["tokens_per_s_gpu"])
    item("projected_8x_ms_per_step", num(train, "projected_8x_ms_per_step"), RECORD["ms_per_step"], "{:.1f}",
         lambda m: m <= RECORD["ms_per_step"])
    gib = peak_mib / 1024 if peak_mib is not None else None
    item("peak_gib", gib, RECORD["peak_gib"], "{:.1f}", lambda g: g <= 80 * 1e9 / 2**30)  # fits an H100
    item("export_s", num(train, "export_s"), RECORD["export_s"], "{:.1f}", lambda s: s <= RECORD["export_s"])
    item("ttt_projected_8x_s", num(ttt, "projected_8gpu_s"), TTT_TARGET_S, "{:.0f}", lambda s: s <= TTT_TARGET_S)
    behind = [i.split(":")[0] for i in items if i.endswith("BEHIND")]
    missing = [i.split(":")[0] for i in items if i.endswith("n/a")]
    mfu = num(train, "mfu_pct")  # reported, not judged: the record published no MFU
    items.append(f"mfu_pct:{'n/a' if mfu is None else f'{mfu:.1f}'}")
    said = (["behind the record on " + ", ".join(behind)] if behind else []) + \
        (["not measured: " + ", ".join(missing)] if missing else [])
    return [" ".join(items), "verdict: " + ("; ".join(said) or "at or past the record on every figure")]


def peak_memory_mib(text: str) -> float | None:
    m = re.search(r"gpu_check_memory peak memory (?:allocated|\(process max RSS\)): (\d+) MiB", text)
    return float(m.group(1)) if m else None


def verdict_stage(args) -> None:
    read = {s: (Path(args.dir) / f"{s}.log").read_text() if (Path(args.dir) / f"{s}.log").exists() else ""
            for s in ("train", "ttt", "kernels")}
    train, ttt = parse_fields(read["train"], "gpu_check_train"), parse_fields(read["ttt"], "ttt_gpu_projection")
    for line in (ln for s in ("train", "kernels", "ttt") for ln in read[s].splitlines()
                 if ln.startswith(("gpu_check_train", "gpu_check_memory", "gpu_check_kernels", "ttt_gpu_projection",
                                   "ttt_gpu_measured", "export "))):
        print(line)
    print(f"record: {RECORD['ms_per_step']} ms/step on 8xH100 = {RECORD['tokens_per_s_gpu']:.0f} tokens/s/GPU, "
          f"peak {RECORD['peak_gib']:.1f} GiB, export ~{RECORD['export_s']:.0f} s, TTT eval "
          f"{RECORD['ttt_eval_s'][0]:.0f}-{RECORD['ttt_eval_s'][1]:.0f} s (our bar {TTT_TARGET_S:.0f} s)")
    for line in verdict_lines(train, ttt, peak_memory_mib(read["train"])):
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="stage", required=True)
    d = sub.add_parser("data")
    d.add_argument("dir")
    d.add_argument("--tokens", type=int, default=8_000_000)
    t = sub.add_parser("train")
    t.add_argument("--warmup", type=int, default=3, help="compile steps per looping state")
    t.add_argument("--steps", type=int, default=4, help="timed steps per looping state")
    t.add_argument("--work", default=".", help="where the export writes its artifact (and log)")
    t.add_argument("--profile", type=int, default=1)
    t.add_argument("--states", choices=("both", "looped"), default="both", help="looped: one compile, half the time")
    t.add_argument("--export", type=int, default=1)
    k = sub.add_parser("kernels")
    k.add_argument("--kernel-tokens", type=int, default=98_304)
    v = sub.add_parser("verdict")
    v.add_argument("dir")
    args = ap.parse_args()
    if args.stage == "data":
        cfg = Hyperparameters.from_env(dict(os.environ, PRESET=os.environ.get("PRESET", "record")))
        write_synthetic_shards(args.dir, cfg.vocab_size, args.tokens)
        print(f"gpu_check_data {list_shards(train_pattern(args.dir))} vocab:{cfg.vocab_size}", flush=True)
    else:
        {"train": train_stage, "kernels": kernels_stage, "verdict": verdict_stage}[args.stage](args)


if __name__ == "__main__":
    main()
