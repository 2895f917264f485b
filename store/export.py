"""Datasets out of the store: OpenAI fine-tuning JSONL and Hugging Face `datasets` folders.

The writer takes plain rows (one per trained transition: the prompt messages, the assistant
response, the tools offered, the credited reward and the ids that lead back to the spans) and
streams them to disk, so a selection of millions of rows never sits in memory. What a row holds
is decided above (`lightspan.trainer.export` turns span trees into transitions); this module only
knows the formats and the files.

- `openai-jsonl`: one line per row in OpenAI's chat fine-tuning format (`messages`, `tools`), the
  earlier assistant turns of the prompt weighted 0 so only the transition's own response trains.
  OpenAI refuses keys it does not know, so the reward and links go to a line-aligned sidecar
  `<name>.links.jsonl` (line i describes line i).
- `hf`: a `datasets.Dataset` saved with `save_to_disk` (Arrow), loadable with
  `datasets.load_from_disk`; the reward and links are columns, the tools' JSON schemas JSON text
  (Arrow needs one type per column, and a JSON schema has none).

Both are written under a temporary name and renamed, so a failed export leaves no partial
dataset, and an existing output is replaced only when the caller says so (`force`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from lightspan.errors import InvalidInput, LightspanError

Format = Literal["openai-jsonl", "hf"]
FORMATS: tuple[Format, ...] = ("openai-jsonl", "hf")
# The message keys OpenAI's chat fine-tuning format accepts (its format-validation cookbook's list).
OPENAI_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "weight"})


@dataclass(slots=True)
class ExportRow:
    """One trained transition: its prompt and response, the tools offered, and where it came from."""

    messages: list[dict[str, Any]]  # the prompt, OpenAI chat format
    response: dict[str, Any]  # the assistant message the call produced
    tools: list[dict[str, Any]] | None
    reward: float  # the credited return training uses for this call
    trace_id: str
    span_id: str
    rollout_id: str
    resources_id: str
    task_id: str
    agent_name: str

    def links(self) -> dict[str, Any]:
        row = asdict(self)
        for key in ("messages", "response", "tools"):
            del row[key]
        return row


def links_path(out: Path) -> Path:
    """The sidecar of an `openai-jsonl` export: `train.jsonl` → `train.links.jsonl`."""
    return out.with_name(f"{out.stem}.links{out.suffix or '.jsonl'}")


def check_output(out: Path, fmt: Format, *, force: bool) -> None:
    """Refuse to replace what exists unless `force`: an export is a file people keep."""
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    targets = [out, links_path(out)] if fmt == "openai-jsonl" else [out]
    existing = [str(path) for path in targets if path.exists() or path.is_symlink()]
    if existing and not force:
        raise InvalidInput(f"{', '.join(existing)} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise InvalidInput(f"the folder of --out does not exist: {out.parent}")


def openai_message(message: dict[str, Any], *, weight: int | None = None) -> dict[str, Any]:
    """A message as OpenAI's fine-tuning format takes it: its keys only, text parts as one string."""
    out = {key: value for key, value in message.items() if key in OPENAI_MESSAGE_KEYS}
    content = out.get("content")
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        out["content"] = "".join(p["text"] for p in content)
    elif content is None and not out.get("tool_calls"):
        out["content"] = ""
    if weight is not None and out.get("role") == "assistant":
        out["weight"] = weight
    return out


def openai_example(row: ExportRow) -> dict[str, Any]:
    """The OpenAI chat fine-tuning line of a row: earlier assistant turns weighted 0, the response 1."""
    messages = [openai_message(m, weight=0) for m in row.messages]
    messages.append(openai_message({**row.response, "role": "assistant"}, weight=1))
    example: dict[str, Any] = {"messages": messages}
    if row.tools:
        example["tools"] = row.tools
    return example


def _hf_message(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    return {
        "role": message.get("role") or "",
        "content": content if isinstance(content, str) or content is None else json.dumps(content),
        "name": message.get("name"),
        "tool_call_id": message.get("tool_call_id"),
        "tool_calls": [
            {
                "id": call.get("id") or "",
                "type": call.get("type") or "function",
                "function": {
                    "name": (call.get("function") or {}).get("name") or "",
                    "arguments": (call.get("function") or {}).get("arguments") or "",
                },
            }
            for call in message.get("tool_calls") or []
        ],
    }


def hf_record(row: ExportRow) -> dict[str, Any]:
    """A row as the `hf` export's columns hold it (see `hf_features`)."""
    return {
        "messages": [_hf_message(m) for m in [*row.messages, {**row.response, "role": "assistant"}]],
        "tools": [
            {
                "type": tool.get("type") or "function",
                "function": {
                    "name": (tool.get("function") or {}).get("name") or "",
                    "description": (tool.get("function") or {}).get("description") or "",
                    "parameters": json.dumps((tool.get("function") or {}).get("parameters") or {}),
                },
            }
            for tool in row.tools or []
        ],
        **row.links(),
    }


def hf_features() -> Any:
    """The Arrow schema of the `hf` export, declared so every row of a stream fits the first's."""
    from datasets import Features, List, Value

    text = Value("string")
    call = {"id": text, "type": text, "function": {"name": text, "arguments": text}}
    message = {"role": text, "content": text, "name": text, "tool_call_id": text, "tool_calls": List(call)}
    tool = {"type": text, "function": {"name": text, "description": text, "parameters": text}}
    return Features(
        {
            "messages": List(message),
            "tools": List(tool),
            "reward": Value("float64"),
            "trace_id": text,
            "span_id": text,
            "rollout_id": text,
            "resources_id": text,
            "task_id": text,
            "agent_name": text,
        }
    )


def write_dataset(rows: Iterable[ExportRow], fmt: Format, out: str | Path, *, force: bool = False) -> int:
    """Stream `rows` into `out` in `fmt`; returns how many were written.

    The output appears only when every row is written (temporary name, then rename).
    """
    out = Path(out)
    check_output(out, fmt, force=force)
    if fmt == "hf":
        return _write_hf(rows, out)
    return _write_openai(rows, out)


def _temporary(out: Path) -> Path:
    """A hidden name beside `out`: the rename that publishes it stays on one file system."""
    return out.with_name(f".{out.name}.{os.getpid()}.tmp")


def _write_openai(rows: Iterable[ExportRow], out: Path) -> int:
    sidecar = links_path(out)
    temporary = [_temporary(out), _temporary(sidecar)]
    written = 0
    try:
        with temporary[0].open("w") as data, temporary[1].open("w") as links:
            for row in rows:
                data.write(json.dumps(openai_example(row), ensure_ascii=False) + "\n")
                links.write(json.dumps(row.links(), ensure_ascii=False) + "\n")
                written += 1
        os.replace(temporary[1], sidecar)
        os.replace(temporary[0], out)
    finally:
        for path in temporary:
            path.unlink(missing_ok=True)
    return written


def _write_hf(rows: Iterable[ExportRow], out: Path) -> int:
    try:
        from datasets import Dataset
        from datasets.arrow_writer import ArrowWriter
    except ImportError:
        raise LightspanError(
            "--format hf needs the datasets library: pip install 'lightspan[train]'"
        ) from None
    work = _temporary(out)
    work.mkdir()
    try:
        # Rows go to one Arrow file as they come (ArrowWriter flushes every `writer_batch_size`),
        # so memory stays flat; `save_to_disk` then lays it out as `load_from_disk` reads it.
        arrow = work / "rows.arrow"
        with ArrowWriter(features=hf_features(), path=str(arrow), writer_batch_size=1000) as writer:
            for row in rows:
                writer.write(hf_record(row))
            written, _ = writer.finalize()
        # One shard at least: datasets writes none for an empty table, and then cannot load it.
        Dataset.from_file(str(arrow)).save_to_disk(str(work / "dataset"), num_shards=1)
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()
        os.replace(work / "dataset", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return int(written)
