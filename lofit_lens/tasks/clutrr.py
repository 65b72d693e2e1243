"""CLUTRR task_1.2 (2-hop kinship reasoning): greedy generation, SFT, exact match.

Protocol (docs/protocol.md): the story with its "[" "]" name markers removed, a question "how is
{c2} related to {c1}?" and the answer slot ``{c2} is {c1} 's`` followed by a newline; the
model must generate the relation (``target_text``, e.g. ``daughter-in-law``). Validation and
test use all 450 rows; training uses a 300-row sample (``train_sample_size``).

The ``official`` protocol is the authors' code (fc2869/lo-fit):
- their loader splits the query's names on "," and keeps the leading space of the second,
  so every prompt reads ``how is  Roy related to Cleo? Answer:  Roy is Cleo 's`` (two spaces);
- the prediction is the text between the first and second "'s\n" of prompt + output
  decoded together, cut at "." (not at a newline), stripped and lower-cased, from 16 new
  tokens; the gold relation is lower-cased, not stripped;
- the training sample is ``random.seed(42); random.sample(data, 300)``, whatever the run's seed.
``clean`` writes the names with single spaces, cuts the output at "." or a newline, decodes
8 new tokens (enough for the longest relation) and draws the sample with the run's seed.

Default hyperparameters are the ones a prototype found to work on the small embedded model
(SmolLM2-135M): lambda 1e-3, lr_select 5e-3, lr_bias 1e-2. The paper's Llama-2-7B values
(Table 6) are in ``PAPER_HYPERPARAMS``.

"""

from __future__ import annotations

import ast
import json
from typing import Any

from lofit_lens.tasks.base import GenerationExample, ProtocolName, Task, TaskHyperparams, require_files

ORIGIN = "CLUTRR task_1.2 (Sinha et al. 2019) as split by the LoFiT authors (clutrr/{split}.json)"

PROMPT = (
    'Read the following story about a family. "{story}" Assume the relations described in '
    "the story are all true. Based on relations between the fictional characters in the story "
    "(assume the relations are all true) and your commonsense knowledge about family "
    "relationship, how is {c2} related to {c1}? Answer: {c2} is {c1} 's\n"
)

# Llama-2-7B, 3% of heads (Table 6); bias-tuning lr is 5e-3 at 10% of heads.
PAPER_HYPERPARAMS = TaskHyperparams(l1_lambda=5e-3, lr_select=5e-4, lr_bias=1e-2)


class Clutrr(Task):
    """CLUTRR 2-hop relations: ``clutrr/{train,val,test}.json`` (3151/450/450 rows)."""

    name = "clutrr"
    kind = "generation"
    loss = "sft"
    hyperparams = TaskHyperparams(l1_lambda=1e-3, lr_select=5e-3, lr_bias=1e-2)
    train_sample_size = 300
    OFFICIAL_SAMPLE_SEED = 42

    def __init__(self, data_dir=None, protocol: ProtocolName = "official"):
        super().__init__(data_dir, protocol)
        official = self.protocol == "official"
        # clean: 8 tokens cover the longest relation ("daughter-in-law") and its ".".
        # Stopping at "." is exact under both parses: nothing after the first "." is read.
        self.max_new_tokens = 16 if official else 8
        self.stop_strings = (".",) if official else (".", "\n")

    def train_sample_seed(self, seed: int) -> int:
        return self.OFFICIAL_SAMPLE_SEED if self.protocol == "official" else seed

    @property
    def parse_with_prompt(self) -> bool:
        return self.protocol == "official"

    def load_split(self, split: str) -> list[GenerationExample]:
        name = f"clutrr/{split}.json"
        require_files(self.data_dir, [name], ORIGIN)
        path = self.data_dir / name
        examples = [clutrr_example(row, self.protocol)
                    for row in json.loads(path.read_text(encoding="utf-8"))]
        for i, ex in enumerate(examples):  # a one-line JSON array: rows named file[i]
            ex.meta.update(file=str(path), index=i)
        return examples

    def parse(self, text: str) -> str:
        """official (``text`` is prompt + output): the text between the first and the second
        "'s\\n", cut at "." (not at a newline); clean (the output alone): the text before the
        first "." and the first newline. Both stripped and lower-cased."""
        if self.protocol == "official":
            parts = text.split("'s\n")
            return parts[1].split(".")[0].strip().lower() if len(parts) > 1 else ""
        return text.split(".")[0].split("\n")[0].strip().lower()


def query_names(query: str, protocol: ProtocolName = "official") -> tuple[str, str]:
    """(c1, c2) of a query such as ``"('Cleo', 'Roy')"``. official: the authors'
    ``query[1:-1].replace("'", "").split(",")``, which leaves c2 a leading space (and drops
    apostrophes inside names); clean: ``ast.literal_eval``."""
    if protocol == "official":
        c1, c2 = query[1:-1].replace("'", "").split(",")
        return c1, c2
    c1, c2 = ast.literal_eval(query)
    return c1, c2


def clutrr_example(row: dict[str, Any], protocol: ProtocolName = "official") -> GenerationExample:
    """One CLUTRR row -> prompt ending in "'s\\n" and the gold relation."""
    c1, c2 = query_names(row["query"], protocol)
    story = row["clean_story"].replace("[", "").replace("]", "")
    target = row["target_text"]
    return GenerationExample(
        prompt=PROMPT.format(story=story, c1=c1, c2=c2),
        answers=(target.lower() if protocol == "official" else target.strip().lower(),),
        target=target,
        meta={"id": row["id"], "query": (c1, c2), "f_comb": row.get("f_comb")},
    )
