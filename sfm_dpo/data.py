"""Preference data: load any source, normalize every known schema into TRL's prompt/chosen/rejected, validate with
errors that name the row, and tokenize exactly once, here, for training and for `scripts/analyze_dataset.py`.

Schemas (facts from the published data):
- allenai/Dolci-Think-DPO-7B: `prompt` (str) and `chosen`/`rejected` = the FULL conversation [user, assistant].
  Passed raw this crashes TRL 1.x (a string prompt beside conversational completions).
- allenai/Dolci-Instruct-DPO: no `prompt`; `chosen`/`rejected` = full conversations of 24-key message dicts (nearly all
  null) sharing all but the final assistant turn; some rows have chosen == rejected.
- TRL's conversational (`prompt` = messages, completions = assistant messages) and standard (all strings) formats.
Every conversational row becomes prompt = the shared messages, chosen/rejected = the final assistant turn.

Tokenization is ours rather than TRL's `_prepare_dataset` because TRL 1.x dropped `max_prompt_length` (we keep the
END of an over-long prompt, as TRL 0.x did) and because the analysis script must count exactly what training sees.
"""

import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets

from .durable import atomic_write

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
ROW_ID_COLUMNS = ("id", "prompt_id")
# Columns carried through normalization so that reports can break numbers down by them.
METADATA_COLUMNS = ("dataset_source", "preference_type")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
# Local JSON rows travel as text until validated (see `_json_lines`).
RAW_COLUMN = "raw_json"
# A digest of each normalized pair's content: what "the same pair" means for the held-out split (see `split_for_eval`).
PAIR_ID_COLUMN = "pair_id"
EVAL_SPLIT_FILE = "eval_split.json"


class InvalidDataError(ValueError):
    """Malformed rows, named with their index, id and fault."""


@dataclass
class DataReport:
    """What the data step did, written next to the run's outputs and logged."""

    source: str
    rows_read: int = 0
    invalid_rows_skipped: dict[str, int] = field(default_factory=dict)
    degenerate_pairs_dropped: int = 0
    degenerate_pairs_kept: int = 0
    prompts_truncated: int = 0
    pairs_truncated: int = 0
    pairs_dropped_overlong: int = 0
    pairs_dropped_prompt_fills_max_length: int = 0
    pairs_identical_after_truncation: int = 0
    pairs_used: int = 0  # after every filter; the held-out pairs below are among them
    pairs_held_out_for_eval: int = 0

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def log(self, log=logger) -> None:
        log.info("Data report: %s", json.dumps(asdict(self)))


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _json_lines(files: list[str]):
    """Yields each JSON row as raw text. Arrow never infers a schema from it, so a row with a wrong type reaches our
    validation (and an error naming it) instead of failing deep inside pyarrow."""
    for file in files:
        with open(file) as f:
            head = f.read(1)
            while head.isspace():
                head = f.read(1)
            f.seek(0)
            if head == "[":  # a .json array
                for i, row in enumerate(json.load(f)):
                    yield {RAW_COLUMN: json.dumps(row), "source_line": f"{file}:{i}"}
                continue
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise InvalidDataError(f"{file}, line {line_no}: not valid JSON ({e.msg}).") from None
                yield {RAW_COLUMN: line, "source_line": f"{file}:{line_no}"}


def load_preference_rows(source: str, config: str | None = None, split: str = "train") -> datasets.Dataset:
    """A Hub dataset id, a local .jsonl/.json/.parquet file, a folder of them, or a `save_to_disk` folder."""
    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".parquet"))
        if not files:
            raise FileNotFoundError(f"No .jsonl, .json or .parquet file under {path}.")
        suffixes = {p.suffix for p in files}
        if len(suffixes) > 1 and suffixes != {".jsonl", ".json"}:
            raise ValueError(f"Mixed data formats under {path}: {sorted(suffixes)}.")
    elif path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.exists():
            raise FileNotFoundError(f"Dataset file {path} does not exist.")
        files, suffixes = [path], {path.suffix}
    elif path.exists():
        raise ValueError(f"Unsupported dataset file {path}: expected .jsonl, .json, .parquet or a folder.")
    elif source.startswith((".", "/")) or source.count("/") != 1:
        raise FileNotFoundError(f"{source!r} is neither a local file or folder nor a Hub dataset id (ORG/NAME).")
    else:
        return datasets.load_dataset(source, config, split=split)
    if ".parquet" in suffixes:
        return datasets.load_dataset("parquet", data_files=[str(p) for p in files], split="train")
    try:
        # datasets caches a generator's rows by its arguments (the paths), not by the files' contents: without this
        # fingerprint an edited file would silently load its old rows.
        stamp = json.dumps([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
        fingerprint = hashlib.sha256(stamp.encode()).hexdigest()
        return datasets.Dataset.from_generator(
            _json_lines, gen_kwargs={"files": [str(p) for p in files]}, fingerprint=fingerprint
        )
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, InvalidDataError):
            raise e.__cause__ from None
        raise


# ---------------------------------------------------------------------------------------------------------------------
# Normalization


class _RowFault(Exception):
    pass


def _check_messages(messages, name: str) -> list[dict]:
    if messages is None:
        raise _RowFault(f"'{name}' is null")
    if not isinstance(messages, list):
        raise _RowFault(f"'{name}' must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise _RowFault(f"'{name}' is empty")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _RowFault(f"{name}[{i}] is not a message dict (got {type(message).__name__})")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _RowFault(f"{name}[{i}] has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if content is None:
            raise _RowFault(f"{name}[{i}] has null content")
        if not isinstance(content, str):
            raise _RowFault(f"{name}[{i}] has non-string content ({type(content).__name__})")
        if not content.strip():
            raise _RowFault(f"{name}[{i}] has empty content")
        # Only role and content reach the chat template: Dolci-Instruct's 22 other keys are nearly all null.
        clean.append({"role": role, "content": content})
    return clean


def _check_text(value, name: str) -> str:
    if value is None:
        raise _RowFault(f"'{name}' is null")
    if not isinstance(value, str):
        raise _RowFault(f"'{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _RowFault(f"'{name}' is empty")
    return value


def _check_ends_with_assistant(chosen: list[dict], rejected: list[dict]) -> None:
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise _RowFault(f"'{name}' does not end with an assistant turn (last role: {messages[-1]['role']})")


def _split_conversations(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Full conversations sharing all but their final assistant turn -> (prompt, [chosen turn], [rejected turn])."""
    _check_ends_with_assistant(chosen, rejected)
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) < 2:
            raise _RowFault(f"'{name}' has no prompt turn before its assistant turn")
    shared = min(len(chosen), len(rejected)) - 1
    for i in range(shared):
        if chosen[i] != rejected[i]:
            raise _RowFault(f"chosen and rejected diverge before their last turn (at message {i})")
    if len(chosen) != len(rejected):
        raise _RowFault(
            f"chosen and rejected diverge before their last turn ({len(chosen)} vs {len(rejected)} messages)"
        )
    return chosen[:-1], chosen[-1:], rejected[-1:]


def detect_format(column_names: list[str], first_row: dict) -> str:
    """'conversation' (Dolci Think/Instruct: full conversations), 'conversational' (TRL: prompt messages +
    completions) or 'standard' (TRL: strings)."""
    for name in ("chosen", "rejected"):
        if name not in column_names:
            raise InvalidDataError(f"The dataset has no '{name}' column (columns: {column_names}).")
    chosen = first_row.get("chosen")
    if isinstance(chosen, str):
        if "prompt" not in column_names:
            raise InvalidDataError("String chosen/rejected need a 'prompt' column (TRL's standard format).")
        return "standard"
    if isinstance(first_row.get("prompt"), list):
        return "conversational"
    return "conversation"


def normalize_row(row: dict, fmt: str) -> dict:
    """One raw row -> {'prompt', 'chosen', 'rejected'} in TRL's conversational (or standard) format; raises _RowFault."""
    if fmt == "standard":
        return {name: _check_text(row.get(name), name) for name in ("prompt", "chosen", "rejected")}
    chosen = _check_messages(row.get("chosen"), "chosen")
    rejected = _check_messages(row.get("rejected"), "rejected")
    if fmt == "conversational":
        prompt = _check_messages(row.get("prompt"), "prompt")
        _check_ends_with_assistant(chosen, rejected)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if "prompt" in row and row["prompt"] is not None and not isinstance(row["prompt"], str):
        raise _RowFault(f"'prompt' must be a string, got {type(row['prompt']).__name__}")
    prompt, chosen, rejected = _split_conversations(chosen, rejected)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _row_label(row: dict, index: int) -> str:
    for column in ROW_ID_COLUMNS:
        if row.get(column) is not None:
            return f"row {index} ({column}={row[column]!r})"
    return f"row {index}"


def normalize_dataset(
    dataset: datasets.Dataset,
    report: DataReport,
    skip_invalid_rows: bool = False,
    keep_degenerate_pairs: bool = False,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Normalize every row; malformed rows stop the run with an error naming them (or are skipped and counted)."""
    report.rows_read = len(dataset)
    if len(dataset) == 0:
        raise InvalidDataError(f"The dataset {report.source!r} has no rows.")
    is_raw = RAW_COLUMN in dataset.column_names
    first = json.loads(dataset[0][RAW_COLUMN]) if is_raw else dataset[0]
    fmt = detect_format(list(first) if is_raw else dataset.column_names, first)
    logger.info("Data format of %s: %s", report.source, fmt)
    empty = "" if fmt == "standard" else []

    def normalize(row, index):
        where = ""
        if is_raw:
            where = f" at {row['source_line']}"
            row = json.loads(row[RAW_COLUMN])
        try:
            pair = normalize_row(row, fmt)
            fault = ""
        except _RowFault as e:
            pair = {"prompt": empty, "chosen": empty, "rejected": empty}
            fault = f"{_row_label(row, index)}{where}: {e}"
        # New column names: reusing "chosen" would make `map` keep the input's 24-key message schema.
        out = {f"normalized_{k}": v for k, v in pair.items()}
        if is_raw:
            out.update({c: row.get(c) for c in METADATA_COLUMNS if c in first})
        out["invalid_reason"] = fault
        out["is_degenerate"] = not fault and pair["chosen"] == pair["rejected"]
        return out

    keep = [c for c in METADATA_COLUMNS if c in dataset.column_names]
    drop = [c for c in dataset.column_names if c not in keep]
    normalized = dataset.map(
        normalize, with_indices=True, remove_columns=drop, num_proc=num_proc, desc="Normalizing preference rows"
    )
    faults = [r for r in normalized["invalid_reason"] if r]
    if faults:
        if not skip_invalid_rows:
            shown = "\n  ".join(faults[:10])
            more = f"\n  ... and {len(faults) - 10} more" if len(faults) > 10 else ""
            raise InvalidDataError(
                f"{len(faults)} malformed row(s) in {report.source}:\n  {shown}{more}\n"
                "Fix the data, or pass --skip_invalid_rows to skip them (counted by reason)."
            )
        reasons = Counter(r.split(": ", 1)[1].split(" (")[0] for r in faults)
        report.invalid_rows_skipped = dict(reasons.most_common())
        logger.warning("Skipping %d malformed rows: %s", len(faults), report.invalid_rows_skipped)
        normalized = normalized.filter(lambda r: not r, input_columns="invalid_reason", num_proc=num_proc)
    n_degenerate = sum(normalized["is_degenerate"])
    if keep_degenerate_pairs:
        report.degenerate_pairs_kept = n_degenerate
    elif n_degenerate:
        report.degenerate_pairs_dropped = n_degenerate
        logger.info("Dropping %d degenerate pairs (chosen == rejected: no gradient).", n_degenerate)
        normalized = normalized.filter(lambda d: not d, input_columns="is_degenerate", num_proc=num_proc)
    normalized = normalized.remove_columns(["invalid_reason", "is_degenerate"])
    return normalized.rename_columns({f"normalized_{k}": k for k in ("prompt", "chosen", "rejected")})


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(row: dict, tokenizer) -> dict:
    """Untruncated token ids of one normalized pair: prompt once, each completion once (loss only on completions).

    Like TRL, the completion starts where the tokenized prompt and prompt+completion diverge."""
    if isinstance(row["prompt"], str):
        prompt_text = row["prompt"]
        full = [prompt_text + row[side] + tokenizer.eos_token for side in ("chosen", "rejected")]
    else:
        prompt_text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = [
            tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False) for side in ("chosen", "rejected")
        ]
    # The chat template writes bos itself where the model wants one; never add it twice.
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    chosen_full, rejected_full = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in full)
    n_prompt = min(_common_prefix_length(prompt_ids, chosen_full), _common_prefix_length(prompt_ids, rejected_full))
    return {
        "prompt_ids": prompt_ids[:n_prompt],
        "chosen_ids": chosen_full[n_prompt:],
        "rejected_ids": rejected_full[n_prompt:],
    }


def truncate_pair(ids: dict, max_length: int, max_prompt_length: int | None, overlong_policy: str) -> dict:
    """Applies max_prompt_length (keep the end) and max_length (truncate completions or drop the pair).

    Returns the final ids plus flags the report counts. A pair is never longer than max_length afterwards, so the
    stock collator and the packed one see the same tokens."""
    prompt, chosen, rejected = ids["prompt_ids"], ids["chosen_ids"], ids["rejected_ids"]
    prompt_truncated = max_prompt_length is not None and len(prompt) > max_prompt_length
    if prompt_truncated:
        prompt = prompt[-max_prompt_length:]
    room = max_length - len(prompt)
    overlong = max(len(chosen), len(rejected)) > room
    drop_overlong = overlong and overlong_policy == "drop"
    prompt_fills = room <= 0
    if overlong and not drop_overlong:
        chosen, rejected = chosen[: max(room, 0)], rejected[: max(room, 0)]
    # Pairs that differ only past the cut become identical: no gradient, so they count as degenerate.
    identical = not (drop_overlong or prompt_fills) and chosen == rejected
    return {
        "prompt_ids": prompt,
        "chosen_ids": chosen,
        "rejected_ids": rejected,
        "prompt_truncated": prompt_truncated,
        "pair_truncated": overlong and not drop_overlong and not prompt_fills,
        "drop": drop_overlong or prompt_fills,
        "drop_overlong": drop_overlong,
        "drop_prompt_fills": prompt_fills and not drop_overlong,
        "identical_after_truncation": identical,
    }


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer,
    max_length: int,
    max_prompt_length: int | None,
    overlong_policy: str,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Adds the final `prompt_ids`/`chosen_ids`/`rejected_ids` and the raw (untruncated) token counts, which the
    analysis script reads."""

    def tokenize(row):
        raw = tokenize_pair(row, tokenizer)
        out = truncate_pair(raw, max_length, max_prompt_length, overlong_policy)
        out.update(
            num_prompt_tokens=len(raw["prompt_ids"]),
            num_chosen_tokens=len(raw["chosen_ids"]),
            num_rejected_tokens=len(raw["rejected_ids"]),
        )
        return out

    return dataset.map(tokenize, num_proc=num_proc, desc="Tokenizing pairs")


def prepare_dataset(script_args, training_args, tokenizer) -> tuple[datasets.Dataset, DataReport]:
    """Load -> normalize -> tokenize -> truncate/drop, with a report of every row left out or changed."""
    source = script_args.dataset_name
    report = DataReport(source=source)
    raw = load_preference_rows(source, script_args.dataset_config, script_args.dataset_train_split)
    if script_args.max_train_samples is not None:
        raw = raw.select(range(min(script_args.max_train_samples, len(raw))))
    num_proc = training_args.dataset_num_proc
    normalized = normalize_dataset(
        raw, report, script_args.skip_invalid_rows, script_args.keep_degenerate_pairs, num_proc=num_proc
    )
    normalized = normalized.map(
        lambda row: {PAIR_ID_COLUMN: pair_id(row)}, num_proc=num_proc, desc="Identifying pairs (held-out split)"
    )
    tokenized = tokenize_dataset(
        normalized,
        tokenizer,
        training_args.max_length,
        script_args.max_prompt_length,
        script_args.overlong_policy,
        num_proc=num_proc,
    )
    report.prompts_truncated = sum(tokenized["prompt_truncated"])
    report.pairs_truncated = sum(tokenized["pair_truncated"])
    report.pairs_dropped_overlong = sum(tokenized["drop_overlong"])
    report.pairs_dropped_prompt_fills_max_length = sum(tokenized["drop_prompt_fills"])
    report.pairs_identical_after_truncation = sum(tokenized["identical_after_truncation"])
    drop_identical = not script_args.keep_degenerate_pairs
    tokenized = tokenized.filter(
        lambda drop, identical: not (drop or (identical and drop_identical)),
        input_columns=["drop", "identical_after_truncation"],
        num_proc=num_proc,
    )
    report.pairs_used = len(tokenized)
    if report.pairs_used == 0:
        raise InvalidDataError(f"No usable pair left in {source}: {asdict(report)}")
    text_columns = [c for c in ("prompt", "chosen", "rejected", "drop") if c in tokenized.column_names]
    return tokenized.remove_columns(text_columns), report


# ---------------------------------------------------------------------------------------------------------------------
# Held-out evaluation split
#
# A pair is held out when a hash of (seed, its content) falls below the ratio: membership depends on that pair alone,
# not on row order or on which other rows a setting filtered out. So every sweep point over the same data and seed
# (other model, learning rate, max_length...) holds out the same pairs, as far as each keeps them at all (a pair
# dropped as overlong at one max_length is missing from that point's eval set, not replaced). The content is the
# normalized prompt/chosen/rejected, before tokenization: a model with another tokenizer still means the same pairs.


def pair_id(pair: dict) -> str:
    """16 hex digits of sha256 over the normalized pair (prompt, chosen, rejected); equal pairs share an id."""
    content = json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def is_held_out(pair_id: str, seed: int, ratio: float) -> bool:
    """True for about `ratio` of all ids, fixed by `seed` and the id alone."""
    draw = int(hashlib.sha256(f"{seed}:{pair_id}".encode()).hexdigest()[:16], 16)
    return draw < ratio * 2**64


@dataclass
class EvalSplit:
    """The held-out pairs of a run, recorded in its output folder (`eval_split.json`) when it starts; a resumed run
    (or any later run in that folder) reads them back instead of drawing again."""

    source: str
    seed: int
    ratio: float
    pair_ids: list[str]  # sorted, unique
    eval_pairs: int  # rows held out (duplicated pairs count once per row)
    train_pairs: int
    method: str = "sha256(f'{seed}:{pair_id}') < ratio * 2**64; pair_id = sha256(normalized prompt, chosen, rejected)"

    def save(self, output_dir) -> Path:
        path = Path(output_dir) / EVAL_SPLIT_FILE
        atomic_write(path, (json.dumps(asdict(self), indent=1) + "\n").encode())  # the old record or the new one
        return path

    @classmethod
    def load(cls, output_dir) -> "EvalSplit | None":
        path = Path(output_dir) / EVAL_SPLIT_FILE
        return cls(**json.loads(path.read_text())) if path.exists() else None


def split_for_eval(dataset: datasets.Dataset, script_args, training_args, report: DataReport | None = None):
    """`(train, eval, EvalSplit)`: the held-out pairs (`--eval_split_ratio`, drawn with `--eval_split_seed`, default
    `--seed`) out of `dataset`, or `(dataset, None, None)` without a split. A split recorded in `output_dir` wins over
    the settings (that is what keeps it across resume); any difference from what the settings and the data give now
    is logged as a warning. The caller saves the returned record (rank 0)."""
    ratio = script_args.eval_split_ratio or 0.0
    seed = script_args.eval_split_seed if script_args.eval_split_seed is not None else training_args.seed
    recorded = EvalSplit.load(training_args.output_dir)
    if recorded is None and ratio == 0:
        return dataset, None, None
    ids = dataset[PAIR_ID_COLUMN]
    if recorded is None:
        held_out = {i for i in set(ids) if is_held_out(i, seed, ratio)}
    else:
        held_out = set(recorded.pair_ids)
        _check_recorded_split(recorded, ids, script_args.dataset_name, seed, ratio, training_args.output_dir)
    eval_rows = [k for k, i in enumerate(ids) if i in held_out]
    train_rows = [k for k, i in enumerate(ids) if i not in held_out]
    where = f"{script_args.dataset_name} ({len(dataset)} pairs, eval_split_ratio={ratio}, seed {seed})"
    if not eval_rows:
        raise InvalidDataError(f"The held-out split of {where} is empty: raise --eval_split_ratio.")
    if not train_rows:
        raise InvalidDataError(f"The held-out split of {where} takes every pair: lower --eval_split_ratio.")
    split = recorded or EvalSplit(
        source=script_args.dataset_name, seed=seed, ratio=ratio, pair_ids=sorted(held_out),
        eval_pairs=len(eval_rows), train_pairs=len(train_rows),
    )  # fmt: skip
    if report is not None:
        report.pairs_held_out_for_eval = len(eval_rows)
    logger.info(
        "Held-out split: %d pairs for evaluation, %d for training (%s).",
        len(eval_rows), len(train_rows), "recorded in the output folder" if recorded else f"ratio {ratio}, seed {seed}",
    )  # fmt: skip
    return dataset.select(train_rows), dataset.select(eval_rows), split


def _check_recorded_split(recorded: EvalSplit, ids: list[str], source: str, seed: int, ratio: float, output_dir):
    """Says how the recorded split differs from what the current settings and data would draw."""
    path = Path(output_dir) / EVAL_SPLIT_FILE
    settings = {"source": (recorded.source, source), "seed": (recorded.seed, seed), "ratio": (recorded.ratio, ratio)}
    changed = {name: pair for name, pair in settings.items() if pair[0] != pair[1]}
    if changed:
        logger.warning(
            "The held-out split recorded in %s was drawn with other settings (%s); it is kept, so that no held-out "
            "pair is trained on. For a split with the new settings, use another --output_dir.",
            path, ", ".join(f"{k} {old!r} -> now {new!r}" for k, (old, new) in changed.items()),
        )  # fmt: skip
    present = set(ids)
    missing = [i for i in recorded.pair_ids if i not in present]
    fresh = {i for i in present if is_held_out(i, recorded.seed, recorded.ratio)} - set(recorded.pair_ids)
    if missing or fresh:
        logger.warning(
            "The data changed since the held-out split in %s was recorded: %d of its %d held-out pairs are no longer "
            "in the data (evaluation runs on the %d left), and %d pairs now in the data would have been drawn for it "
            "(they train, as the record does not hold them).",
            path, len(missing), len(recorded.pair_ids), len(recorded.pair_ids) - len(missing), len(fresh),
        )  # fmt: skip
