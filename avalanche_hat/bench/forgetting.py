"""The paper's Table 2: learn the tasks with HAT, forget task 0, compare every task's accuracy.

HAT-CL (section 4.1.1): after ``forget_task(model, 0)`` tasks 1-4 keep their accuracy to the last
digit, because their units, weights and heads are not touched. Task 0 loses what it learned: it
computes what a task never trained computes (a fresh task's masks, a freshly initialised head and
norms), so that it can be learned again; that scores near chance, not exactly at it (the paper's
Table 2 gives 50.00%; an erased task whose masks stayed shut would predict one class).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from avalanche_hat import forget_task


@dataclass
class ForgettingResult:
    task: int
    before: list[float]
    after: list[float]
    chance: list[float]  # share of the most frequent class per task (what a constant prediction scores)
    identical_outputs: list[bool]  # per task: logits bit-identical before and after
    reinitialised: dict[str, int]

    def to_markdown(self) -> str:
        t = len(self.before)
        lines = ["| | " + " | ".join(f"task {j}" for j in range(t)) + " |", "|---|" + "---:|" * t,
                 "| before forgetting | " + " | ".join(f"{100 * v:.2f}" for v in self.before) + " |",
                 f"| after forget_task({self.task}) | " + " | ".join(f"{100 * v:.2f}" for v in self.after) + " |",
                 "| logits bit-identical | " + " | ".join("yes" if s else "no" for s in self.identical_outputs) + " |"]
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, d: dict) -> "ForgettingResult":
        return cls(task=d["forgotten_task"], before=d["accuracy_before"], after=d["accuracy_after"],
                   chance=d["chance"], identical_outputs=d["logits_bit_identical"],
                   reinitialised=d["reinitialised_parameters"])

    def to_dict(self) -> dict:
        return {"forgotten_task": self.task, "accuracy_before": self.before, "accuracy_after": self.after,
                "chance": self.chance, "logits_bit_identical": self.identical_outputs,
                "reinitialised_parameters": self.reinitialised}


@torch.no_grad()
def evaluate_tasks(model, test_stream, batch_size: int = 1000, device: str = "cpu"):
    """Per task: accuracy, the logits (for bit-identity checks) and the majority-class share."""
    model.eval()
    accs, logits, chance = [], [], []
    for exp in test_stream:
        task = exp.task_label
        outs, ys = [], []
        loader = torch.utils.data.DataLoader(exp.dataset.eval(), batch_size=batch_size, shuffle=False)
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            outs.append(model(x, task))
            ys.append(y)
        out, y = torch.cat(outs), torch.cat(ys)
        accs.append(int((out.argmax(1) == y).sum()) / len(y))
        logits.append(out.cpu())
        chance.append(torch.bincount(y).max().item() / len(y))
    return accs, logits, chance


def forgetting_experiment(model, test_stream, task: int = 0, device: str = "cpu") -> ForgettingResult:
    """Forget ``task`` in a copy of a trained HAT model and compare every task before and after."""
    before, logits_before, chance = evaluate_tasks(model, test_stream, device=device)
    forgotten = copy.deepcopy(model)
    counts = forget_task(forgotten, task)
    after, logits_after, _ = evaluate_tasks(forgotten, test_stream, device=device)
    identical = [torch.equal(a, b) for a, b in zip(logits_before, logits_after)]
    return ForgettingResult(task=task, before=before, after=after, chance=chance, identical_outputs=identical,
                            reinitialised={k: int(v) for k, v in counts.items()})
