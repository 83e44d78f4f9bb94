"""The demo's console tables (rendered with rich into plain text, so they also read well in a log file)."""

from __future__ import annotations

from collections.abc import Sequence

from gkd.evaluate import render_table


def kl_table(summary: dict) -> str:
    """Held-out KL(teacher || student) before and after training, per token."""
    from rich.table import Table

    t = Table(title=f"held-out KL(teacher || student), nats/token, {summary['heldout_prompts']} prompts")
    for col in ("measured on", "before", "after", "change"):
        t.add_column(col, justify="left" if col == "measured on" else "right")
    names = {"on_policy": "student's own samples (on-policy)", "off_policy": "teacher's answers (off-policy)"}
    for kind, label in names.items():
        k = summary["kl"][kind]
        t.add_row(label, f"{k['before']:.3f}", f"{k['after']:.3f}", f"{100 * k['change']:+.1f}%")
    for kind, label in names.items():  # KL(student || teacher): what reverse KL and JSD train
        k = summary.get("reverse_kl", {}).get(kind)
        if k:
            change = k["after"] / k["before"] - 1.0 if k["before"] > 0 else 0.0
            t.add_row(
                "reverse KL, " + label, f"{k['before']:.3f}", f"{k['after']:.3f}", f"{100 * change:+.1f}%"
            )
    g = summary.get("teacher_logprob_of_greedy")
    if g:
        t.add_row(
            "teacher log-prob of the student's greedy answers", f"{g['before']:.3f}", f"{g['after']:.3f}", ""
        )
    st = summary.get("greedy_stats")
    if st:
        n = summary["heldout_prompts"]
        b, a = st["before"], st["after"]
        t.add_row(
            "greedy answers looping (repeated 4-gram)",
            f"{b['looping']:.0f}/{n}",
            f"{a['looping']:.0f}/{n}",
            "",
        )
        t.add_row("greedy answers' distinct-2", f"{b['distinct_2']:.3f}", f"{a['distinct_2']:.3f}", "")
    return render_table(t)


def answers_table(samples: Sequence[dict], width: int = 160) -> str:
    """Greedy answers side by side: student before, student after, teacher."""
    from rich.table import Table

    t = Table(title="held-out prompts, greedy answers", show_lines=True)
    for col in ("prompt", "student before", "student after", "teacher"):
        t.add_column(col, overflow="fold", ratio=1)
    for s in samples:
        t.add_row(*(s[k][:width] for k in ("prompt", "student_before", "student_after", "teacher")))
    return render_table(t)
