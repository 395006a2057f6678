"""``bench/serve.py``'s ratios (the issue's targets table) and its printed summary."""

from __future__ import annotations

from typing import Any

CONCURRENCY = (1, 16, 64)


def ratio(name: str, num: float | None, den: float | None, target: str | None = None,
          met: bool | None = None, note: str = "") -> dict[str, Any]:
    value = round(num / den, 3) if num is not None and den else None
    out: dict[str, Any] = {"name": name, "value": value}
    if target is not None:
        out["target"] = target
        out["met"] = met
    if note:
        out["note"] = note
    return out


def compute_ratios(points: list[dict[str, Any]], ort_rows: list[dict[str, Any]], grpc_points: list[dict[str, Any]],
                   tolerance: float) -> list[dict[str, Any]]:
    """The issue's targets table (kiln REST = batching on, tiny model), then informational ratios."""
    def get(server: str, model: str, batching: bool | None, c: int, field: str) -> float | None:
        for p in points:
            if p["server"] == server and p["model"] == model and p["batching"] == batching and p["concurrency"] == c:
                return p[field]
        return None

    def limit(model: str) -> float | None:
        rates = [r["calls_per_s"] for r in ort_rows if r["model"] == model and r["batch"] == 1]
        return max(rates) if rates else None

    def target(v: dict[str, Any], text: str, ok) -> dict[str, Any]:
        return {**v, "target": text, "met": v["value"] is not None and ok(v["value"])}

    peers = sorted({p["server"] for p in points if p["server"] != "kiln"})
    out = []
    for c in CONCURRENCY:
        rates = {peer: get(peer, "tiny", None, c, "rps") for peer in peers}
        rates = {k: v for k, v in rates.items() if v}
        best = max(rates, key=rates.get) if rates else None
        v = ratio(f"rest_vs_best_peer_rps_c{c} (tiny)", get("kiln", "tiny", True, c, "rps"), rates.get(best),
                  note=f"best peer: {best}")
        goal = 1.5 if c == 1 else 2.0
        out.append(target(v, f">= {goal}", lambda x, g=goal: x >= g))
    for c in CONCURRENCY:
        v = ratio(f"rest_vs_kserve_rps_c{c} (tiny)", get("kiln", "tiny", True, c, "rps"),
                  get("kserve", "tiny", None, c, "rps"))
        out.append(target(v, ">= 3.0", lambda x: x >= 3.0) if c != 1 else v)
    p99s = {peer: get(peer, "tiny", None, 16, "p99_ms") for peer in peers}
    p99s = {k: v for k, v in p99s.items() if v}
    lowest = min(p99s, key=p99s.get) if p99s else None
    v = ratio("rest_p99_vs_best_peer_p99_c16 (tiny)", get("kiln", "tiny", True, 16, "p99_ms"), p99s.get(lowest),
              note=f"the peer with the lowest p99 at c=16: {lowest}")
    out.append(target(v, "<= 0.5", lambda x: x <= 0.5))
    by = {(p["protocol"], p["concurrency"]): p for p in grpc_points}
    for c in CONCURRENCY:
        g, r = by.get(("grpc", c)), by.get(("rest", c))
        v = ratio(f"grpc_vs_rest_rps_c{c} (tiny, h2load, server-counted OK)",
                  g and g["server_ok"] / g["duration_s"], r and r["server_ok"] / r["duration_s"])
        out.append(target(v, ">= 1.3", lambda x: x >= 1.3) if c == 16 else v)
    for c in CONCURRENCY:
        e, r = by.get(("grpc_echo_floor", c)), by.get(("rest", c))
        out.append(ratio(f"grpc_echo_floor_vs_rest_rps_c{c} (h2load)", e and e["rps"],
                         r and r["server_ok"] / r["duration_s"],
                         note="a grpc.aio server answering a fixed response, no model: "
                              "the ceiling of gRPC in Python here"))
    for c in CONCURRENCY:
        v = ratio(f"batching_on_vs_off_rps_c{c} (heavy)", get("kiln", "heavy", True, c, "rps"),
                  get("kiln", "heavy", False, c, "rps"))
        out.append(target(v, ">= 3.0", lambda x: x >= 3.0) if c == 64 else v)
    for c in CONCURRENCY:
        v = ratio(f"batching_on_vs_off_rps_c{c} (tiny)", get("kiln", "tiny", True, c, "rps"),
                  get("kiln", "tiny", False, c, "rps"))
        if v["value"] is not None:
            v.update(target=f">= 1.0 (must not lower throughput; met within a {tolerance:.0%} noise band)",
                     met=v["value"] >= 1.0 - tolerance, met_strict=v["value"] >= 1.0)
        out.append(v)
    for model in ("tiny", "heavy"):
        for c in CONCURRENCY:
            for server, batching in (("kiln", True), ("kiln", False), *((p, None) for p in peers)):
                label = f"{server}{'' if batching is None else (' batching on' if batching else ' batching off')}"
                out.append(ratio(f"{label}_vs_in_process_ort_batch1_rps_c{c} ({model})",
                                 get(server, model, batching, c, "rps"), limit(model)))
    return [r for r in out if r["value"] is not None]


def print_summary(result: dict[str, Any]) -> None:
    print(f"\n{'server':<8}{'model':<7}{'batching':>9}{'c':>4}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>7}"
          f"{'batch':>7}{'CPU us/req':>11}")
    for p in result["points"]:
        b = {True: "on", False: "off", None: "-"}[p["batching"]]
        batch = p.get("breakdown", {}).get("mean_batch_requests", "")
        print(f"{p['server']:<8}{p['model']:<7}{b:>9}{p['concurrency']:>4}{p['rps']:>10.1f}{p['p50_ms']:>9.2f}"
              f"{p['p99_ms']:>9.2f}{p['errors']:>7}{batch:>7}{p['server_cpu_us_per_request']:>11.0f}")
    print("\nin-process ONNX Runtime (one caller thread):")
    print(f"{'model':<7}{'session':<17}{'batch':>6}{'mean ms':>9}{'p99 ms':>9}{'calls/s':>10}{'images/s':>10}")
    for r in result["in_process_ort"]:
        print(f"{r['model']:<7}{r['session']:<17}{r['batch']:>6}{r['mean_ms']:>9.3f}{r['p99_ms']:>9.3f}"
              f"{r['calls_per_s']:>10.1f}{r['images_per_s']:>10.0f}")
    print("\nratios (targets recorded, not asserted):")
    for r in result["ratios"]:
        target = f"  target {r['target']}: {'met' if r['met'] else 'MISSED'}" if "target" in r else ""
        print(f"  {r['name']:<66}{r['value']:>8.3f}{target}")
    print("\nper-request breakdown, kiln (mean us; from /metrics deltas):")
    print(f"{'model':<7}{'batching':>9}{'c':>4}{'client':>9}{'handler':>9}{'queue':>9}{'infer':>9}{'infer/req':>10}"
          f"{'dec+enc+':>9}{'outside':>9}")
    for p in result["points"]:
        bd = p.get("breakdown")
        if not bd:
            continue
        print(f"{p['model']:<7}{'on' if p['batching'] else 'off':>9}{p['concurrency']:>4}{bd['client_latency_us']:>9.0f}"
              f"{bd['handler_total_us']:>9.0f}{bd['queue_us']:>9.0f}{bd['inference_us']:>9.0f}"
              f"{bd['inference_amortised_us']:>10.0f}{bd['decode_encode_other_us']:>9.0f}{bd['outside_handler_us']:>9.0f}")
    codec = result["kiln_codec_in_process"]
    print(f"\nkiln codec in-process (tiny, {codec['body_bytes']} B body): decode {codec['decode_us']} us "
          f"(pydantic parse {codec['pydantic_parse_us']} us), inference {codec['inference_us']} us, "
          f"encode {codec['encode_us']} us")
