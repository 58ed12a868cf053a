"""A conversation over a long document whose turns flow into one beacon memory.

The conversation is one long sequence: the document, then every turn's prompt and answer (in the tokenizer's chat
template when it has one). Each turn is read into the same memory the document was read into, so a turn sees
every earlier turn (through the raw cache of the open window while it is recent, through the beacons of its window
once the window completes) and the memory stays within ``sink + N / r + window`` entries however long the
conversation grows (``N``: tokens of document and turns so far; ``r``: the compression ratio).

Each turn costs one ``generate`` over the prompt (it consumes the memory: prompt and answer but its last token go
in) and one short forward call for the answer's last token and the template's end-of-turn tokens. ``Chat.save``
writes the memory (`BeaconMemory.save`) and the transcript so far.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .memory import BeaconMemory
from .reuse import as_token_batch, cache_kwargs, read

PLAIN_TURN = "\n\nQuestion: {question}\nAnswer:"  # turn format of a tokenizer without a chat template
PLAIN_END = "\n"


class ChatFormat:
    """Text of the document and of every turn, with ``tokenizer``'s chat template when it has one.

    With a template the document is the first user message (after the template's own system prompt, if any) and
    a turn's prompt is what the template adds for a user message and the assistant's generation prompt; the
    end-of-turn text is what the template writes after an assistant answer. Without one: the document verbatim,
    `PLAIN_TURN` and `PLAIN_END`.
    """

    def __init__(self, tokenizer, use_template: Optional[bool] = None):
        self.tokenizer = tokenizer
        has = bool(getattr(tokenizer, "chat_template", None))
        self.templated = has if use_template is None else (use_template and has)
        self.messages: list[dict] = []

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _delta(self, before: list[dict], after: list[dict], generation_prompt: bool) -> str:
        head, full = self._render(before, False), self._render(after, generation_prompt)
        if not full.startswith(head):
            raise ValueError("this chat template rewrites earlier turns (its rendering of a longer conversation does "
                             "not extend the shorter one), so turns cannot be appended to a memory: use "
                             "use_template=False")
        return full[len(head):]

    def document(self, text: str) -> list[int]:
        """Token ids of the document as the conversation's opening."""
        if not self.templated:
            return self._encode(text)
        message = {"role": "user", "content": text}
        ids = self._encode(self._delta(self.messages, self.messages + [message], False))
        self.messages.append(message)
        return ids

    def prompt(self, question: str) -> list[int]:
        """Token ids of a user turn up to the point where the assistant answers."""
        if not self.templated:
            return self._encode(PLAIN_TURN.format(question=question))
        return self._encode(self._delta(self.messages, self.messages + [{"role": "user", "content": question}], True))

    def end(self, question: str, answer: str) -> list[int]:
        """Token ids the template writes after ``answer`` (e.g. ``<|im_end|>\\n``); records the turn."""
        if not self.templated:
            return self._encode(PLAIN_END)
        turn = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        head = self._render(self.messages + turn[:1], True) + answer
        full = self._render(self.messages + turn, False)
        self.messages += turn
        return self._encode(full[len(head):]) if full.startswith(head) else self._encode(PLAIN_END)


class Chat:
    """A multi-turn conversation over one beacon memory (batch of one).

    ``Chat(model)`` works on token ids (`read_ids`, `turn`); ``Chat(model, tokenizer)`` adds text (`read_text`,
    `say`) in the tokenizer's chat template. ``memory`` continues a memory read earlier (e.g. `BeaconMemory.load`).
    ``generate_kwargs`` are the defaults of every turn's ``generate`` (greedy, 128 new tokens unless given).
    """

    def __init__(self, model, tokenizer=None, memory: Optional[BeaconMemory] = None, use_template=None,
                 **generate_kwargs):
        if memory is not None and not isinstance(memory, BeaconMemory):
            raise TypeError(f"memory must be a BeaconMemory or None, got {type(memory).__name__}")
        if memory is not None and memory.batch_size != 1:
            raise ValueError(f"a chat holds one conversation: the memory must have 1 row, got {memory.batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.memory = memory
        self.format = ChatFormat(tokenizer, use_template) if tokenizer is not None else None
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.generate_kwargs = {"max_new_tokens": 128, "do_sample": False, **({"pad_token_id": pad} if pad is not None
                                                                                 else {}), **generate_kwargs}
        self.transcript: list[dict] = []
        self.fed: list[int] = []  # every token id that went into the memory through this chat, in order

    def _ids(self, ids: list[int]) -> torch.Tensor:
        """``ids`` as a (1, N) tensor on the device of the model's input embeddings."""
        embeddings = self.model.get_input_embeddings()
        return torch.tensor([ids], device=embeddings.weight.device)

    # --- ids ------------------------------------------------------------------------------------------------
    def read_ids(self, ids, progress=None) -> None:
        """Read ``ids`` (1, N) into the memory (the document, or anything said without an answer)."""
        ids = as_token_batch("ids", ids)
        if ids.shape[0] != 1:
            raise ValueError(f"a chat holds one conversation: ids must have 1 row, got {ids.shape[0]}")
        self.memory = read(self.model, ids, memory=self.memory, progress=progress)
        self.fed += ids[0].tolist()

    @torch.no_grad()
    def turn(self, prompt_ids, end_ids=(), **generate_kwargs) -> torch.Tensor:
        """One turn: answer ``prompt_ids`` (1, L) from the memory, then read the answer and ``end_ids`` (the
        end-of-turn tokens; one equal to the answer's last token, e.g. an end-of-turn eos, is not repeated) into
        it. Returns the answer's ids (1, T)."""
        prompt_ids = as_token_batch("prompt_ids", prompt_ids)
        if prompt_ids.shape[0] != 1:
            raise ValueError(f"a chat holds one conversation: prompt_ids must have 1 row, got {prompt_ids.shape[0]}")
        kwargs = {**self.generate_kwargs, **generate_kwargs}
        if self.memory is None:  # nothing read yet: the prompt opens the conversation
            out = self.model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                      use_cache=True, return_dict_in_generate=True, **kwargs)
        else:
            past = torch.ones(1, self.memory.get_seq_length(), dtype=torch.long, device=prompt_ids.device)
            mask = torch.cat((past, torch.ones_like(prompt_ids)), 1)
            out = self.model.generate(input_ids=prompt_ids, attention_mask=mask,
                                      use_cache=True, return_dict_in_generate=True,
                                      **cache_kwargs(self.model, self.memory), **kwargs)
        from .compat import output_cache

        self.memory = output_cache(out)  # consumed: prompt + answer but its last token are in
        answer = out.sequences[:, prompt_ids.shape[1]:]
        end = list(end_ids)
        if end and answer.shape[1] and end[0] == int(answer[0, -1]):
            end = end[1:]
        rest = torch.cat((answer[:, -1:], torch.tensor([end], dtype=answer.dtype, device=answer.device)), dim=1)
        self.memory = read(self.model, rest, memory=self.memory)
        self.fed += prompt_ids[0].tolist() + answer[0].tolist() + end
        return answer

    # --- text -----------------------------------------------------------------------------------------------
    def _need_tokenizer(self) -> None:
        if self.format is None:
            raise ValueError("this chat has no tokenizer: pass one to Chat(model, tokenizer) to chat in text")

    def read_text(self, text: str, progress=None) -> int:
        """Read a document into the memory (as the first user message under a chat template); returns its tokens."""
        self._need_tokenizer()
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the document is empty: pass some text")
        ids = self.format.document(text)
        self.read_ids(self._ids(ids), progress=progress)
        self.transcript.append({"role": "document", "tokens": len(ids)})
        return len(ids)

    def say(self, question: str, **generate_kwargs) -> str:
        """Ask ``question`` as the next turn; the answer's text (special tokens dropped)."""
        self._need_tokenizer()
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty: type some text")
        prompt = self._ids(self.format.prompt(question))
        answer_ids = self.turn(prompt, **generate_kwargs)  # the end-of-turn ids depend on the answer's text
        text = self.tokenizer.decode(answer_ids[0], skip_special_tokens=True)
        # turn() read only the answer's last token; the end-of-turn text follows it
        end = self.format.end(question, text.strip())
        last = int(answer_ids[0, -1])
        if end and end[0] == last:
            end = end[1:]
        if end:
            self.memory = read(self.model, self._ids(end), memory=self.memory)
            self.fed += end
        self.transcript += [{"role": "user", "content": question}, {"role": "assistant", "content": text.strip()}]
        return text.strip()

    # --- reading and saving ---------------------------------------------------------------------------------
    def entries(self) -> int:
        """Memory entries held (sink + beacons + raw cache): what the next token attends to."""
        return 0 if self.memory is None else self.memory.num_entries()[0]

    def save(self, path) -> None:
        """Write the memory (`BeaconMemory.save`) and ``transcript.json`` (the turns so far) to the folder ``path``."""
        if self.memory is None:
            raise ValueError("nothing has been read yet: there is no memory to save")
        self.memory.save(path, self.model)
        (Path(path) / "transcript.json").write_text(json.dumps(self.transcript, indent=1) + "\n")
