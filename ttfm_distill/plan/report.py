"""The plan as rich tables (and as JSON)."""

from __future__ import annotations

from .estimate import GB, GPUS, Plan

DM_WHAT = ("for the full student a full trainable copy of the teacher (fp32 weights, gradients, AdamW state; sharded "
           "like the student under FSDP), for the LoRA student LoRA adapters of its rank on the shared frozen base")

TEACHER_NOTE = (
    "Frozen teacher (full student): {bf16:.1f} GB in bf16 (linear/conv weights; {fp32:.1f} GB in fp32), sharded "
    "under FSDP: {per:.2f} GB per GPU at {n} GPUs with bf16 (scale.prepare_frozen; docs/plan.md).")


def _b(n: float) -> str:
    if n >= 1e12:
        return f"{n / 1e12:.2f}T"
    if n >= 1e9:
        return f"{n / 1e9:.3g}B"
    if n >= 1e6:
        return f"{n / 1e6:.3g}M"
    if n >= 1e3:
        return f"{n / 1e3:.3g}k"
    return f"{int(n)}"


def _gb(n: float) -> str:
    if n == 0:
        return "-"
    return f"{n / GB:.2f}" if n < 10 * GB else f"{n / GB:.1f}"


def _flops(n: float) -> str:
    for unit, f in (("PF", 1e15), ("TF", 1e12), ("GF", 1e9), ("MF", 1e6)):
        if n >= f:
            return f"{n / f:.3g} {unit}"
    return f"{n:.3g} F"


def _time(sec: float | None) -> str:
    if sec is None:
        return "-"
    if sec < 1e-3:
        return f"{sec * 1e6:.3g} us"
    return f"{sec * 1e3:.0f} ms" if sec < 1 else f"{sec:.2f} s"


def _rate(v: float | None) -> str:
    if not v:
        return "-"
    return f"{v:.2f}" if v < 1000 else f"{v:.3g}"


def render(plan: Plan, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=120)
    c = plan.counts
    ev = plan.evaluations
    shape = "x".join(str(d) for d in c.data_shape)
    console.print(f"[bold]{c.teacher}[/] ({c.class_name}): latents {shape}, {c.image_tokens} image tokens"
                  + (f" + {c.text_tokens} text tokens" if c.text_tokens else "") + f", {c.resolution} px")

    t = Table(title="Parameters (counted on the meta device)", title_justify="left")
    for col in ("", "parameters", "note"):
        t.add_column(col, justify="right" if col == "parameters" else "left")
    t.add_row("teacher", _b(c.teacher_parameters), f"+ {c.teacher_buffer_bytes / 4 / 1e6:.1f}M in buffers"
              if c.teacher_buffer_bytes else "")
    if c.published:
        pub = c.published["parameters"]
        whole = c.teacher_parameters + c.teacher_buffer_bytes / 4
        t.add_row("published", _b(pub), f"{c.published['source']}; counted {100 * (c.teacher_parameters / pub - 1):+.1f}%"
                  + (f" (with buffers {100 * (whole / pub - 1):+.1f}%)" if c.teacher_buffer_bytes else ""))
    t.add_row("student (full copy)", _b(c.full.student_parameters), "teacher network + second-time embedding")
    t.add_row("trained (full)", _b(c.full.trained), "")
    if c.lora:
        t.add_row(f"trained (LoRA rank {c.lora_rank})", _b(c.lora.trained), "adapters + second-time embedding")
    t.add_row("added embeddings", _b(c.full.added_embeddings), "zero-initialised second-time MLP")
    console.print(t)

    gpu = GPUS[plan.gpu]
    t = Table(title=f"FLOPs (model FLOPs, forward and backward) and time on {gpu['name']} at MFU {plan.mfu:.2f} "
                    "(assumed)", title_justify="left")
    for col in ("", "full", "LoRA"):
        t.add_column(col, justify="right" if col else "left")
    lora = c.lora
    t.add_row("teacher forward", _flops(c.teacher_forward_flops), _flops(c.teacher_forward_flops) if lora else "-")
    t.add_row("student forward", _flops(c.full.forward_flops), _flops(lora.forward_flops) if lora else "-")
    t.add_row("student forward + backward", _flops(c.full.train_flops), _flops(lora.train_flops) if lora else "-")
    evals = f"{ev['train']:g} grad + {ev['student_nograd']:g} no-grad + {ev['teacher']:g} teacher"
    if ev.get("fake_train"):
        evals += f" + {ev['fake']:g} fake + {ev['fake_train']:g} fake update{'s' if ev['fake_train'] != 1 else ''}"
    t.add_row("evaluations per sample", evals, evals)
    per = {lay.student: lay.flops_per_sample for lay in plan.layouts}
    t.add_row("per training sample", _flops(per.get("full", 0)), _flops(per["lora"]) if "lora" in per else "-")
    for prec in ("bf16", "fp32"):
        rate = gpu[prec] * plan.mfu
        t.add_row(f"samples/s, {plan.gpus} GPU(s), {prec}", _rate(plan.gpus * rate / per["full"]),
                  _rate(plan.gpus * rate / per["lora"]) if "lora" in per else "-")
    console.print(t)
    console.print(f"[dim]evaluations per sample: {ev['note']}[/]")

    for prec in ("bf16", "fp32"):
        shown = [lay for lay in plan.layouts if lay.supported and lay.precision == prec]
        what = "bf16 autocast, fp32 master weights" if prec == "bf16" else "fp32"
        scale_, unit = (GB, "GB") if max(lay.peak_bytes for lay in shown) >= GB else (1e6, "MB")
        mem = lambda n: "-" if n == 0 else (f"{n / scale_:.2f}" if n < 10 * scale_ else f"{n / scale_:.1f}")  # noqa: E731
        t = Table(title=f"Memory per GPU ({unit}), {what}, on {plan.gpus} x {plan.gpu_memory / GB:.3g} GB with "
                        f"{100 * plan.headroom:.0f}% headroom; batch = the largest that fits"
                  + (f" (at most {plan.batch_size})" if plan.batch_size else ""), title_justify="left")
        t.add_column("term")
        for lay in shown:
            t.add_column(f"{lay.student}\n{lay.parallel.upper()}{' ckpt' if lay.checkpointing else ''}", justify="right")
        for term in shown[0].terms:
            values = [lay.terms.get(term, 0) for lay in shown]
            if any(values):
                t.add_row(term, *(mem(v) for v in values))
        t.add_row("activations / sample", *(mem(lay.activations_per_sample) for lay in shown))
        t.add_row("largest batch / GPU", *(str(lay.largest_batch) for lay in shown))
        t.add_row("peak at that batch", *(mem(lay.peak_bytes) for lay in shown))
        t.add_row("step (predicted)", *(_time(lay.step_seconds) for lay in shown))
        t.add_row("samples/s (predicted)", *(_rate(lay.samples_per_second) for lay in shown))
        console.print(t)
    unsupported = sorted({lay.note for lay in plan.layouts if not lay.supported})
    for note in unsupported:
        console.print(f"[dim]not shown: {note}[/]")
    console.print(f"[bold green]recommendation[/] (cheapest layout that fits, per student): {plan.recommendation}")
    held = c.teacher_held_bytes or {"fp32": c.teacher_parameters * 4, "bf16": c.teacher_parameters * 4}
    console.print(TEACHER_NOTE.format(bf16=(held["bf16"] + c.teacher_buffer_bytes) / GB,
                                      fp32=(held["fp32"] + c.teacher_buffer_bytes) / GB,
                                      per=(held["bf16"] / plan.gpus + c.teacher_buffer_bytes) / GB, n=plan.gpus))
    if plan.dm:
        console.print(f"Distribution matching: the fake network is, as the run holds it, {DM_WHAT}; its terms are the "
                      "'fake' rows; the step figures are a stage step's.")
    else:
        console.print("Distribution matching not planned: a flow teacher's default run (1400 steps or more) ends with a "
                      "stage that trains a fake network; --dm plans it, --set dm_weight=0 runs without it.")
    console.print("[dim]assumptions: " + "; ".join(plan.assumptions) + ".[/]")
