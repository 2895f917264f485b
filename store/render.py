"""Terminal rendering of a rollout's span tree (`lightspan show`), via rich."""

from __future__ import annotations

from rich.text import Text
from rich.tree import Tree

from lightspan.types import Span, SpanTree


def _duration(span: Span) -> str:
    ms = span.duration_ns / 1e6
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def render_tree(tree: SpanTree, llm_calls: set[str], rewards: dict[str, float]) -> Tree:
    """A rich Tree of the rollout: LLM calls, rewards and errors marked.

    `llm_calls` and `rewards` come from the store's typed `rollout_spans` columns, so the
    terminal shows exactly what training will see.
    """
    root = Tree(Text(f"rollout {tree.rollout_id}  ({len(tree)} spans)", style="bold"))
    nodes: dict[str, Tree] = {}
    for _, span in tree.walk():
        label = Text(span.name, style="bold cyan" if span.span_id in llm_calls else "")
        label.append(f"  {_duration(span)}", style="dim")
        if span.span_id in llm_calls:
            label.append("  [LLM]", style="cyan")
            model = span.attr("gen_ai.request.model") or span.attr("llm.model_name")
            if model:
                label.append(f" {model}", style="dim cyan")
        if span.span_id in rewards:
            label.append(f"  [reward {rewards[span.span_id]:g}]", style="bold green")
        if span.is_error:
            label.append(f"  [ERROR {span.status_message}]".rstrip(), style="bold red")
        parent = nodes.get(span.parent_span_id, root)
        nodes[span.span_id] = parent.add(label)
    return root
