"""The bench report: report.json (versioned schema, docs/report_schema.md), report.md, a Rich table, PNG plots,
and `--compare`, which merges several reports (e.g. 50/60/70%) into one table."""

from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import UserError
from .latency import speedup
from .pairs import MAX_REL_WIDTH, MIN_PAIRS

SCHEMA = "losa-deploy/bench-report"
VERSION = 1
COMPARE_SCHEMA = "losa-deploy/bench-compare"

# Which sides a suite's speed-ups compare: (label, base side, test side), side = "<runtime>/<dense|sparse>"; the
# speed-up is base / test per interleaved round (pairs.py). The first comparison present is the headline.
# FASTEST_DENSE: per phase, the dense CPU side with the lowest median latency in the same rounds (the strongest
# dense baseline this machine has installed: ONNX Runtime, DeepSparse dense, torch or sparse-cpu on the dense model).
FASTEST_DENSE = "fastest-dense"
DENSE_CPU_SIDES = ("onnxruntime/dense", "deepsparse/dense", "torch/dense", "sparse-cpu/dense")
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("sparse-cpu vs fastest dense", FASTEST_DENSE, "sparse-cpu/sparse"),
    ("deepsparse vs onnxruntime dense", "onnxruntime/dense", "deepsparse/sparse"),
    ("torch-2of4 vs torch dense (GPU)", "torch-cuda/dense", "torch-2of4/sparse"),
    ("sparse-cpu vs onnxruntime dense", "onnxruntime/dense", "sparse-cpu/sparse"),
    ("sparse-cpu vs deepsparse sparse", "deepsparse/sparse", "sparse-cpu/sparse"),
    ("sparse-cpu vs sparse-cpu dense", "sparse-cpu/dense", "sparse-cpu/sparse"),
    ("deepsparse vs deepsparse dense", "deepsparse/dense", "deepsparse/sparse"),
    ("onnxruntime vs onnxruntime dense", "onnxruntime/dense", "onnxruntime/sparse"),
    ("torch vs torch dense", "torch/dense", "torch/sparse"),
)


# ---- environment ------------------------------------------------------------------------------------------------

def hardware_info() -> dict[str, Any]:
    """CPU model, cores, the SIMD flags sparse kernels care about, memory, GPU if any."""
    import os

    from .timing import available_cores

    info: dict[str, Any] = {
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu_model": platform.processor() or None,
    }
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not info.get("cpu_model_name"):
                info["cpu_model_name"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    info["cpu_model"] = info.pop("cpu_model_name", None) or info["cpu_model"]
    info["cores_logical"] = os.cpu_count()
    info["cores_available"] = available_cores()
    info["avx512_flags"] = sorted(f for f in flags if f.startswith("avx512"))
    info["avx2"] = "avx2" in flags
    info["amx"] = sorted(f for f in flags if f.startswith("amx"))
    try:
        import psutil

        info["memory_bytes"] = int(psutil.virtual_memory().total)
    except Exception:  # pragma: no cover
        info["memory_bytes"] = None
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = {
                "name": torch.cuda.get_device_name(0),
                "capability": list(torch.cuda.get_device_capability(0)),
                "memory_bytes": int(torch.cuda.get_device_properties(0).total_memory),
            }
    except Exception:  # pragma: no cover
        pass
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    return info


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in (
        "losa-deploy",
        "torch",
        "transformers",
        "onnx",
        "onnxruntime",
        "deepsparse",
        "optimum-onnx",
        "lm_eval",
        "numpy",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# ---- building ---------------------------------------------------------------------------------------------------

def new_report(settings: dict[str, Any], command: Sequence[str] | None = None) -> dict[str, Any]:
    return {
        "schema": SCHEMA, "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command) if command else None,
        "hardware": hardware_info(), "versions": versions(), "settings": settings,
        "models": {}, "suites": [], "accuracy": {}, "notes": [],
    }


def phase_names(suite: dict[str, Any]) -> list[str]:
    """Phases present in a suite, in a readable order (prefill by length, ttft, decode, e2e)."""
    names: set[str] = set()
    for rt in suite.get("runtimes", {}).values():
        for var in ("dense", "sparse"):
            names.update((rt.get(var) or {}).get("phases", {}).keys())
    def key(n: str) -> tuple[int, int]:
        order = {"prefill": 0, "ttft": 1, "decode": 2, "e2e": 3}
        head, _, tail = n.partition("_")
        return order.get(head, 9), int(tail) if tail.isdigit() else 0
    return sorted(names, key=key)


def side_phases(suite: dict[str, Any], side: str) -> dict[str, Any] | None:
    """The phases of one measured side ("onnxruntime/dense") of a suite, or None when it did not run."""
    rt, _, var = side.partition("/")
    res = suite.get("runtimes", {}).get(rt) or {}
    m = res.get(var)
    return m.get("phases") if isinstance(m, dict) and m.get("phases") else None


def pair_stats(base: dict[str, Any], test: dict[str, Any]) -> dict[str, Any] | None:
    """Speed-up statistics of one phase, base / test: from per-round pairs when both sides have the same number of
    samples (interleaved rounds), else the ratio of medians only (`paired` false, nothing to quote it with)."""
    from .pairs import pair_ratios, ratio_stats

    bs, ts = base.get("samples_s") or [], test.get("samples_s") or []
    if bs and len(bs) == len(ts) and min(bs) > 0 and min(ts) > 0:
        return {"paired": True, **ratio_stats(pair_ratios(bs, ts))}
    v = speedup(base.get("median_s"), test.get("median_s"))
    if v is None:
        return None
    return {"paired": False, "median": v, "quotable": False, "reason": "samples not from the same rounds"}


def fastest_dense(suite: dict[str, Any], phase: str) -> str | None:
    """The dense CPU side with the lowest median latency for `phase` (ties: the first in DENSE_CPU_SIDES)."""
    best, best_t = None, None
    for side in DENSE_CPU_SIDES:
        ph = (side_phases(suite, side) or {}).get(phase)
        if ph and ph.get("median_s") and (best_t is None or ph["median_s"] < best_t):
            best, best_t = side, ph["median_s"]
    return best


def compute_speedup_stats(suite: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{comparison label: {phase: stats + "base"/"test" side}} for every comparison whose two sides both ran."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for label, base, test in COMPARISONS:
        tp = side_phases(suite, test)
        if not tp:
            continue
        ph: dict[str, dict[str, Any]] = {}
        for name in phase_names(suite):
            b = fastest_dense(suite, name) if base == FASTEST_DENSE else base
            if b is None or b == test:
                continue
            bp = (side_phases(suite, b) or {}).get(name)
            st = pair_stats(bp, tp[name]) if bp and tp.get(name) else None
            if st is not None:
                ph[name] = {"base": b, "test": test, **st}
        if ph:
            out[label] = ph
    return out


def compute_speedups(suite: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """{comparison label: {phase: median of the per-round base/test ratios}} (see compute_speedup_stats)."""
    stats = suite.get("speedup_stats")
    if stats is None:
        stats = compute_speedup_stats(suite)
    return {label: {ph: st["median"] for ph, st in phs.items()} for label, phs in stats.items()}


def headline(suite: dict[str, Any]) -> str | None:
    sp = suite.get("speedups") or {}
    for label, _, _ in COMPARISONS:
        if label in sp:
            return label
    return None


def spread_flags(suite: dict[str, Any]) -> list[str]:
    """One line per speed-up that is too wide to quote (pairs.py's rule), headline first."""
    stats = suite.get("speedup_stats") or {}
    hl = suite.get("headline")
    labels = ([hl] if hl in stats else []) + [k for k in stats if k != hl]
    return [f"{label}: {ph}: {st.get('reason')}" for label in labels for ph, st in stats[label].items()
            if not st.get("quotable")]


def _bound_key(bounds: dict[str, Any], rt: str, var: str) -> str:
    """Which bound a runtime's measurement is judged against: sparse-cpu's own packed format where it has one."""
    if rt == "sparse-cpu" and var == "sparse" and "sparse-cpu" in bounds:
        return "sparse-cpu"
    return var


def compute_percent_of_bound(suite: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{runtime: {dense|sparse: {phase: bound / median * 100}}} for prefill and decode phases."""
    from .bounds import percent_of_bound

    b = suite.get("bounds") or {}
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for rt, res in suite.get("runtimes", {}).items():
        for var in ("dense", "sparse"):
            r = res.get(var)
            key = _bound_key(b, rt, var)
            if not r or not r.get("phases") or key not in b:
                continue
            for phase, bound in b[key].items():
                meas = r["phases"].get(phase)
                if not meas:
                    continue
                secs = bound["seconds"]
                if phase == "decode":  # bound is per token; the phase times decode_tokens steps
                    secs *= meas.get("tokens", 1)
                out.setdefault(rt, {}).setdefault(var, {})[phase] = percent_of_bound(secs, meas["median_s"])
    return out


def apply_rates(suite: dict[str, Any], rates: dict[str, Any]) -> dict[str, Any]:
    """Re-derive every bound of a suite from new machine rates (bound = work / rate; prefill work in FLOP, decode in
    bytes), including the per-linear kernel bounds, then its percentages."""
    for bounds in (suite.get("bounds") or {}).values():
        for b in bounds.values():
            b["rate"] = rates["flops_per_s"] if b.get("unit") == "FLOP" else rates["bytes_per_s"]
            b["seconds"] = b["work"] / b["rate"]
    kern = suite.get("kernels") or {}
    totals: dict[str, float] = {}
    for phases in (kern.get("linears") or {}).values():
        for ph, d in phases.items():
            d["bound_s"] = d["bytes"] / rates["bytes_per_s"] if "bytes" in d else d["flops"] / rates["flops_per_s"]
            d["percent_of_bound"] = 100.0 * d["bound_s"] / d["median_s"] if d["median_s"] > 0 else None
            totals[ph] = totals.get(ph, 0.0) + d["bound_s"]
    for ph, tot in (kern.get("total") or {}).items():
        if ph in totals:
            tot["bound_s"] = totals[ph]
            tot["percent_of_bound"] = 100.0 * tot["bound_s"] / tot["median_s"] if tot["median_s"] > 0 else None
    suite["machine_rates"] = rates
    suite["percent_of_bound"] = compute_percent_of_bound(suite)
    return suite


def finalize_suite(suite: dict[str, Any]) -> dict[str, Any]:
    suite["speedup_stats"] = compute_speedup_stats(suite)
    suite["speedups"] = compute_speedups(suite)
    suite["headline"] = headline(suite)
    suite["flags"] = spread_flags(suite)
    suite["headline_quotable"] = (None if suite["headline"] is None else
                                  all(st.get("quotable") for st in suite["speedup_stats"][suite["headline"]].values()))
    suite["percent_of_bound"] = compute_percent_of_bound(suite)
    return suite


# ---- reading / validating ---------------------------------------------------------------------------------------

def validate_report(rep: Any, where: str = "report") -> dict[str, Any]:
    if not isinstance(rep, dict) or rep.get("schema") != SCHEMA:
        raise UserError(
            f"{where} is not a losa-deploy bench report (schema '{SCHEMA}'): pass a report.json written by 'bench'"
        )
    if rep.get("version") != VERSION:
        raise UserError(f"{where} has report version {rep.get('version')}; this losa-deploy reads version {VERSION}")
    for key in ("hardware", "versions", "settings", "suites", "accuracy"):
        if key not in rep:
            raise UserError(f"{where} is incomplete (no '{key}'); re-run bench")
    return rep


def load_report(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise UserError(f"report '{path}' not found: pass a report.json (or the directory holding it)")
    try:
        rep = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"'{p}' is not valid JSON ({e.msg} at line {e.lineno})")
    return validate_report(rep, str(p))


# ---- rendering --------------------------------------------------------------------------------------------------

def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.1f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _xs(st: dict[str, Any] | None) -> str:
    """A speed-up with its interval, marked when too wide to quote: `1.85x (1.70-2.02)` or `1.2x (0.8-1.9) WIDE`."""
    if not st:
        return "-"
    txt = _x(st.get("median"))
    if st.get("paired"):
        txt += f" ({st['ci_low']:.2f}-{st['ci_high']:.2f})"
    return txt + ("" if st.get("quotable") else " WIDE")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}%"


def _tps(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def suite_rows(suite: dict[str, Any]) -> list[list[str]]:
    """Rows: runtime, phase, dense median ms (p90), sparse median ms (p90), speed-up on that runtime, sparse tok/s,
    % of bound dense/sparse."""
    rows = []
    pob = suite.get("percent_of_bound", {})
    for rt, res in suite.get("runtimes", {}).items():
        d, s = res.get("dense") or {}, res.get("sparse") or {}
        if not d and not s:
            rows.append([rt, "-", "-", "-", "-", "-", "-", f"{res.get('status')}: {res.get('note', '')}"])
            continue
        note = f"{res.get('status')}: {res.get('note', '')}" if res.get("status") != "ok" else ""
        for ph in phase_names(suite):
            dp, sp = d.get("phases", {}).get(ph), s.get("phases", {}).get(ph)
            if not dp and not sp:
                continue
            st = pair_stats(dp, sp) if dp and sp else None
            rows.append([
                rt, ph,
                f"{_ms(dp and dp['median_s'])} ({_ms(dp and dp['p90_s'])})",
                f"{_ms(sp and sp['median_s'])} ({_ms(sp and sp['p90_s'])})",
                _xs(st),
                _tps(sp and sp.get("tokens_per_s")),
                f"{_pct(pob.get(rt, {}).get('dense', {}).get(ph))} / {_pct(pob.get(rt, {}).get('sparse', {}).get(ph))}",
                note,
            ])
            note = ""
    return rows


def _minmax(st: dict[str, Any]) -> str:
    return f"{st['min']:.2f}-{st['max']:.2f}" if st.get("paired") else "-"


def _base_note(st: dict[str, Any] | None, label: str) -> str:
    """For the fastest-dense comparison, which dense runtime it was in that phase."""
    if not st or "fastest" not in label:
        return ""
    return f" [vs {st.get('base')}]"


KERNEL_HEADER = ["linear", "phase", "kernel ms", "bound ms", "% bound", "MB read / GFLOP", "layers"]


def kernel_rows(suite: dict[str, Any]) -> list[list[str]]:
    """Rows of the per-linear kernel timing (sparse-cpu's kernels, each linear summed over layers)."""
    k = suite.get("kernels") or {}
    rows = []
    for name, phs in (k.get("linears") or {}).items():
        for ph, d in phs.items():
            work = f"{d['bytes'] / 1e6:.2f} MB" if ph == "decode" else f"{d['flops'] / 1e9:.3f} GFLOP"
            rows.append([name, ph, f"{1000 * d['median_s']:.3f}", f"{1000 * d['bound_s']:.3f}",
                         _pct(d.get("percent_of_bound")), work, str(d.get("layers"))])
    return rows


def _kernel_note(suite: dict[str, Any]) -> str:
    k = suite.get("kernels") or {}
    return k.get("method", "")


ROW_HEADER = [
    "runtime",
    "phase",
    "dense ms (p90)",
    "sparse ms (p90)",
    "speed-up",
    "sparse tok/s",
    "% bound d/s",
    "note",
]


def rich_tables(rep: dict[str, Any]) -> list[Any]:
    from rich.markup import escape
    from rich.table import Table

    tables = []
    for suite in rep.get("suites", []):
        t = Table(*ROW_HEADER, title=f"{suite['name']}: {suite.get('description', '')}", title_justify="left")
        for r in suite_rows(suite):
            t.add_row(*[escape(c) for c in r])
        tables.append(t)
        hl = suite.get("headline")
        if hl:
            h = Table("phase", "speed-up (interval)", "min-max", "pairs", "dense side",
                      title=f"headline ({suite['name']}): {hl}", title_justify="left")
            for ph, st in (suite.get("speedup_stats") or {}).get(hl, {}).items():
                h.add_row(ph, _xs(st), _minmax(st), str(st.get("pairs", "-")), escape(st.get("base", "-")))
            tables.append(h)
        ks = kernel_rows(suite)
        if ks:
            k = Table(*KERNEL_HEADER, title=f"sparse-cpu kernels per linear ({suite['name']})", title_justify="left")
            for r in ks:
                k.add_row(*r)
            tables.append(k)
    acc = accuracy_rows(rep)
    if acc:
        t = Table("metric", "dense", "sparse", title="accuracy", title_justify="left")
        for r in acc:
            t.add_row(*r)
        tables.append(t)
    return tables


def headline_lines(rep: dict[str, Any]) -> list[str]:
    """One line per suite: its headline speed-up per phase with interval, marked WIDE when not quotable."""
    out = []
    for suite in rep.get("suites", []):
        hl = suite.get("headline")
        if not hl:
            continue
        stats = (suite.get("speedup_stats") or {}).get(hl, {})
        out.append(f"{suite['name']}: {hl}: " + ", ".join(f"{ph} {_xs(st)}{_base_note(st, hl)}"
                                                         for ph, st in stats.items()))
    return out


def accuracy_rows(rep: dict[str, Any]) -> list[list[str]]:
    acc = rep.get("accuracy") or {}
    rows = []
    ppl = acc.get("perplexity")
    if ppl:
        f = lambda v: "-" if not v else f"{v['perplexity']:.3f}"  # noqa: E731
        rows.append(
            [
                f"perplexity ({ppl.get('data_name', 'wikitext2')}, seqlen {ppl.get('seqlen')})",
                f(ppl.get("dense")),
                f(ppl.get("sparse")),
            ]
        )
    zs = acc.get("zeroshot") or {}
    tasks = sorted(
        set((zs.get("dense") or {}).get("tasks", {}).keys()) | set((zs.get("sparse") or {}).get("tasks", {}).keys())
    )
    for task in tasks:
        for metric in ("acc", "acc_norm"):
            def g(var: str) -> str | None:
                r = ((zs.get(var) or {}).get("tasks") or {}).get(task)
                v = _task_acc(r, metric)
                return None if v is None else f"{100 * v:.2f}"
            d, s = g("dense"), g("sparse")
            if d is not None or s is not None:
                rows.append([f"{task} {metric} (%)", d or "-", s or "-"])
    return rows


def _task_acc(r: Any, metric: str = "acc") -> float | None:
    if isinstance(r, (int, float)):
        return float(r) if metric == "acc" else None
    if isinstance(r, dict):
        for k in (metric, f"{metric},none"):
            if isinstance(r.get(k), (int, float)):
                return float(r[k])
    return None


def render_markdown(rep: dict[str, Any]) -> str:
    hw = rep.get("hardware", {})
    st = rep.get("settings", {})
    lines = ["# losa-deploy bench report", ""]
    lines.append(f"- created: {rep.get('created')}; command: `{' '.join(rep.get('command') or [])}`")
    lines.append(f"- hardware: {hw.get('cpu_model')}, {hw.get('cores_available')} of {hw.get('cores_logical')} cores, "
                 f"AVX-512: {', '.join(hw.get('avx512_flags') or []) or 'none'}, AVX2: {hw.get('avx2')}, "
                 f"memory {(hw.get('memory_bytes') or 0) / 2**30:.1f} GiB, load average {hw.get('load_average')}")
    if hw.get("gpu"):
        lines.append(f"- GPU: {hw['gpu']}")
    lines.append(f"- versions: {', '.join(f'{k} {v}' for k, v in rep.get('versions', {}).items() if v)}")
    lat = st.get("latency", {})
    lines.append(
        f"- settings: threads {st.get('threads')}, batch {lat.get('batch')}, prompt lengths {lat.get('prompt_lens')}, "
        f"decode past {lat.get('decode_past')} + {lat.get('decode_tokens')} tokens, "
        f"generation {lat.get('gen_tokens')} tokens, "
        f"warm-up {lat.get('warmup')}, repeats {lat.get('repeats')} (median, p90)"
    )
    for name, m in rep.get("models", {}).items():
        lines.append(
            f"- {name}: `{m.get('path')}` ({m.get('model_type')}, {m.get('layers')} blocks, hidden {m.get('hidden')}, "
            f"sparsity of block linears {_pct(100 * m['sparsity']) if m.get('sparsity') is not None else '-'})"
        )
    lines.append("")
    for suite in rep.get("suites", []):
        lines += [f"## {suite['name']}", "", suite.get("description", ""), ""]
        lines.append("| " + " | ".join(ROW_HEADER) + " |")
        lines.append("|" + "---|" * len(ROW_HEADER))
        for r in suite_rows(suite):
            lines.append("| " + " | ".join(r) + " |")
        lines.append("")
        stats = suite.get("speedup_stats") or {}
        for label, ph in (suite.get("speedups") or {}).items():
            star = " (headline)" if label == suite.get("headline") else ""
            phs = stats.get(label) or {}
            lines.append(f"- speed-up, {label}{star}: " + ", ".join(
                f"{k} {_xs(phs.get(k)) if k in phs else _x(v)}" + _base_note(phs.get(k), label) for k, v in ph.items()))
        if stats:
            lines.append("- speed-up = median of per-round ratios (dense and sparse interleaved), (interval) = "
                         "distribution-free interval of that median; WIDE = too wide to quote (see Flags)")
        ks = kernel_rows(suite)
        if ks:
            lines += ["", f"sparse-cpu kernels per linear, in isolation ({_kernel_note(suite)}):", "",
                      "| " + " | ".join(KERNEL_HEADER) + " |", "|" + "---|" * len(KERNEL_HEADER)]
            lines += ["| " + " | ".join(r) + " |" for r in ks]
            lines.append("")
        b = suite.get("bounds") or {}
        for var in ("dense", "sparse", "sparse-cpu"):
            if var in b:
                lines.append(
                    f"- physical bound, {var}: "
                    + ", ".join(
                        f"{k} {1000 * v['seconds']:.2f} ms" + (" per token" if k == "decode" else "")
                        for k, v in b[var].items()
                    )
                )
        if suite.get("machine_rates"):
            mr = suite["machine_rates"]
            lines.append(f"- measured peak: {mr.get('flops_per_s', 0) / 1e9:.1f} GFLOP/s ({mr.get('flops_method')}); "
                         f"bandwidth {mr.get('bytes_per_s', 0) / 1e9:.1f} GB/s ({mr.get('bandwidth_method')})")
        lines.append("")
    acc = accuracy_rows(rep)
    if acc:
        lines += ["## Accuracy", "", "| metric | dense | sparse |", "|---|---|---|"]
        lines += ["| " + " | ".join(r) + " |" for r in acc]
        lines.append("")
    if rep.get("flags"):
        lines += ["## Flags", "", f"Speed-ups too wide to quote (rule: >= {MIN_PAIRS} pairs and interval width <= "
                  f"{100 * MAX_REL_WIDTH:.0f}% of the median):", ""] + [f"- {f}" for f in rep["flags"]] + [""]
    if rep.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in rep["notes"]] + [""]
    return "\n".join(lines)


# ---- plots ------------------------------------------------------------------------------------------------------

def plot_speedups(rep: dict[str, Any], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []  # (label, phase, value)
    for suite in rep.get("suites", []):
        for label, ph in (suite.get("speedups") or {}).items():
            for phase, v in ph.items():
                if v is not None:
                    bars.append((f"{suite['name']}\n{label}", phase, v))
    if not bars:
        return None
    groups = list(dict.fromkeys(b[0] for b in bars))
    phases = list(dict.fromkeys(b[1] for b in bars))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(phases)) / 2), 4.5))
    w = 0.8 / len(phases)
    for j, phase in enumerate(phases):
        xs, ys = [], []
        for i, g in enumerate(groups):
            v = next((b[2] for b in bars if b[0] == g and b[1] == phase), None)
            if v is not None:
                xs.append(i + j * w)
                ys.append(v)
        ax.bar(xs, ys, w, label=phase)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(groups))])
    ax.set_xticklabels(groups, fontsize=7)
    ax.set_ylabel("speed-up (dense latency / sparse latency)")
    ax.legend(fontsize=7)
    ax.set_title("sparse vs dense, per runtime and phase")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_block_sparsity(block_sparsity: Sequence[float], path: Path, title: str = "per-block sparsity") -> Path | None:
    if not block_sparsity:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(block_sparsity)), 3.5))
    ax.bar(range(len(block_sparsity)), [100 * s for s in block_sparsity])
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity of block linears (%)")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(rep: dict[str, Any], out_dir: Path, block_sparsity: Sequence[float] | None = None) -> dict[str, Path]:
    """report.json, report.md, plots/*.png; each file written atomically."""
    from ..atomic import write_json, write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    for name, fn in (("speedup", lambda p: plot_speedups(rep, p)),
                     ("block_sparsity", lambda p: plot_block_sparsity(block_sparsity or [], p))):
        tmp = out_dir / "plots" / f".{name}.tmp.png"
        got = fn(tmp)
        if got:
            final = out_dir / "plots" / f"{name}.png"
            got.replace(final)
            plots[name] = final
    rep["plots"] = {k: str(v.relative_to(out_dir)) for k, v in plots.items()}
    paths = {
        "json": write_json(out_dir / "report.json", rep),
        "md": write_text(out_dir / "report.md", render_markdown(rep)),
    }
    paths.update(plots)
    return paths


# ---- compare ----------------------------------------------------------------------------------------------------

def compare_reports(reports: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One row per (report, suite): headline speed-ups per phase, sparsity, perplexity. Reports must share settings
    that change timings (threads, prompt lengths), else the merge says so in `warnings`."""
    if len(reports) < 1:
        raise UserError("--compare needs at least one report.json")
    rows = []
    warnings = []
    ref = None
    for label, rep in reports:
        key = (rep["settings"].get("threads"), json.dumps(rep["settings"].get("latency", {}), sort_keys=True),
               rep["hardware"].get("cpu_model"))
        if ref is None:
            ref = key
        elif key != ref:
            warnings.append(
                f"{label}: different threads/latency settings/CPU than the first report; speed-ups are not comparable"
            )
        sp_model = rep.get("models", {}).get("sparse", {})
        ppl = (rep.get("accuracy") or {}).get("perplexity") or {}
        for suite in rep.get("suites", []):
            hl = suite.get("headline")
            rows.append({
                "report": label, "suite": suite["name"],
                "sparsity": suite.get("sparsity", sp_model.get("sparsity")),
                "comparison": hl, "speedups": (suite.get("speedups") or {}).get(hl, {}) if hl else {},
                "quotable": suite.get("headline_quotable"),
                "perplexity_dense": (ppl.get("dense") or {}).get("perplexity"),
                "perplexity_sparse": (ppl.get("sparse") or {}).get("perplexity"),
            })
    return {
        "schema": COMPARE_SCHEMA,
        "version": VERSION,
        "reports": [l for l, _ in reports],
        "rows": rows,
        "warnings": warnings,
    }


def compare_phases(cmp: dict[str, Any]) -> list[str]:
    seen: dict[str, None] = {}
    for r in cmp["rows"]:
        for k in r["speedups"]:
            seen.setdefault(k, None)
    return list(seen)


def compare_table_rows(cmp: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    phases = compare_phases(cmp)
    header = ["report", "suite", "sparsity", "comparison"] + phases + ["ppl dense", "ppl sparse"]
    rows = []
    for r in cmp["rows"]:
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        comp = (r["comparison"] or "-") + (" (WIDE)" if r.get("quotable") is False else "")
        rows.append(
            [r["report"], r["suite"], _pct(None if r["sparsity"] is None else 100 * r["sparsity"]), comp]
            + [_x(r["speedups"].get(p)) for p in phases]
            + [f(r["perplexity_dense"]), f(r["perplexity_sparse"])]
        )
    return header, rows


def render_compare_markdown(cmp: dict[str, Any]) -> str:
    header, rows = compare_table_rows(cmp)
    lines = ["# losa-deploy bench comparison", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if cmp["warnings"]:
        lines += ["", "Warnings:"] + [f"- {w}" for w in cmp["warnings"]]
    return "\n".join(lines) + "\n"


def compare_rich_table(cmp: dict[str, Any]) -> Any:
    from rich.table import Table

    header, rows = compare_table_rows(cmp)
    t = Table(*header, title="comparison (headline speed-ups)", title_justify="left")
    for r in rows:
        t.add_row(*r)
    return t


def labels_for(paths: Iterable[Path]) -> list[str]:
    """Short unique labels: the report's directory name, disambiguated with its parent when needed."""
    ps = [Path(p) for p in paths]
    ps = [p.parent if p.name == "report.json" else p for p in ps]
    names = [p.name for p in ps]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in ps]
