"""MQuAKE-CF 2-hop with in-context editing: greedy generation, SFT, exact match.

Prompt (docs/protocol.md): ``Q: Imagine that {edited}. {question} A:`` where ``edited`` is the
requested rewrite's cloze filled with its subject plus the new object, and ``question`` is
the first of the three multi-hop questions. Gold: ``new_answer``, also ``new_answer_alias``.

The ``official`` protocol is the authors' code (fc2869/lo-fit): the prediction is the text
after the LAST "A:" of prompt + output (16 new tokens, decoded together), cut at the first
newline and lower-cased but NOT stripped, so " Paris" does not match "paris"; the training
text is the prompt, the answer with no space after "A:", then EOS. ``clean`` reads the first
line of the output alone, stripped and lower-cased, and trains on ``" " + new_answer``.

Default hyperparameters (for small models such as SmolLM2-135M) equal the paper's
Llama-2-7B values (Table 6): lambda 1e-3, lr_select 5e-3, lr_bias 1e-2.
"""

from __future__ import annotations

import json
from typing import Any

from lofit_lens.tasks.base import GenerationExample, ProtocolName, Task, TaskHyperparams, require_files

ORIGIN = "MQuAKE-CF 2-hop (Zhong et al. 2023) as split by the LoFiT authors (mquake/{split}.jsonl)"

PROMPT = "Q: Imagine that {edited}. {question} A:"

# Llama-2-7B, 3% of heads (Table 6); bias-tuning lr is 5e-3 at 10% of heads.
PAPER_HYPERPARAMS = TaskHyperparams(l1_lambda=1e-3, lr_select=5e-3, lr_bias=1e-2)


class MQuAKE(Task):
    """MQuAKE 2-hop edits: ``mquake/{train,val,test}.jsonl`` (134/95/864 rows)."""

    name = "mquake"
    kind = "generation"
    loss = "sft"
    hyperparams = TaskHyperparams(l1_lambda=1e-3, lr_select=5e-3, lr_bias=1e-2)
    max_new_tokens = 16

    def __init__(self, data_dir=None, protocol: ProtocolName = "official"):
        super().__init__(data_dir, protocol)
        # official: a later "A:" after the first newline moves the parse, so all 16 tokens
        # are decoded; clean reads the first line, so decoding stops at a newline.
        self.stop_strings = () if self.protocol == "official" else ("\n",)

    @property
    def parse_with_prompt(self) -> bool:
        return self.protocol == "official"

    def load_split(self, split: str) -> list[GenerationExample]:
        name = f"mquake/{split}.jsonl"
        require_files(self.data_dir, [name], ORIGIN)
        path = self.data_dir / name
        examples = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                examples.append(mquake_example(json.loads(line), self.protocol))
                examples[-1].meta.update(file=str(path), line=number)
        return examples

    def parse(self, text: str) -> str:
        """official (``text`` is prompt + output): after the last "A:", up to the first
        newline, lower-cased, not stripped; clean: the output's first line, stripped and
        lower-cased."""
        if self.protocol == "official":
            return text.split("A:")[-1].split("\n")[0].lower()
        return super().parse(text)


def mquake_example(row: dict[str, Any], protocol: ProtocolName = "official") -> GenerationExample:
    """One MQuAKE case -> the edited-fact prompt and the new answer with its aliases."""
    rewrite = row["requested_rewrite"][0]
    edited = rewrite["prompt"].format(rewrite["subject"]) + " " + rewrite["target_new"]["str"]
    golds = [row["new_answer"], *row["new_answer_alias"]]
    official = protocol == "official"
    answers = tuple(dict.fromkeys(a.lower() if official else a.strip().lower() for a in golds))
    return GenerationExample(
        prompt=PROMPT.format(edited=edited, question=row["questions"][0]),
        answers=answers,
        target=row["new_answer"] if official else " " + row["new_answer"],
        meta={"case_id": row["case_id"]},
    )
