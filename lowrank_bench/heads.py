"""Task heads: a causal LM read as a classifier, and one head per task for continual sequences.

`DecoderClassifier` turns a causal LM into a sequence classifier without losing its LM head (a continual run
measures the LM's perplexity between stages): the final hidden state at each sequence's last real token goes
through a linear head. The last real token is found from the attention mask, and position ids are counted from
it, so an example's logits are the same alone, right-padded or left-padded in a batch (HF's own
`*ForSequenceClassification` finds the token from `pad_token_id` and numbers positions from the left edge, which
shifts left-padded examples). `pooling = "last_position"` reads the last position instead, whatever it holds, with
the model's own position ids: CURLoRA's notebooks (`model(**inputs)["logits"][:, -1, :]`, `code/*.ipynb`), where
GPT-2's right-padded training batches are read at a pad token (their MRPC and SST-2 evaluation, one unpadded example
at a time, reads the last real token; `code/utils.py:118-125`).

`HeadBank` keeps one head per task of a continual sequence and puts the right one in place: the current task's
while it trains, each earlier task's while that task is re-evaluated. Two protocols:
- `standard`: the model's own classification head, freshly initialised per task (encoders: a copy of their
  `classifier` module; decoders: a bias-free linear layer, HF's `score`, N(0, initializer_range));
- `curlora`: CURLoRA's notebooks (arXiv 2408.14572): `nn.Linear(hidden, classes)` with bias, PyTorch's default
  initialisation under `torch.manual_seed(1311)` for every task.
Each task may also read its sequence its own way (`pooling`, per task), set on the model when its head is in place.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from lowrank_bench.errors import LrbenchError, choices

PROTOCOLS = ("standard", "curlora")
POOLINGS = ("last_token", "last_position")
CURLORA_HEAD_SEED = 1311


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for right and left padding alike."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask).argmax(-1)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:  # regression (STS-B)
        return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
    return nn.functional.cross_entropy(logits.float(), labels)


class DecoderClassifier(nn.Module):
    """A causal LM (`lm`, its LM head kept for perplexity) with a linear head on its last real token.
    `token_type_ids` are dropped: a decoder has no segments (GPT-2 would add their embeddings to its input)."""

    def __init__(self, lm: nn.Module, score: nn.Module, pooling: str = "last_token"):
        super().__init__()
        self.lm = lm
        self.score = score
        self.config = lm.config
        self.pooling = pooling

    def forward(self, input_ids, attention_mask=None, labels=None, **_) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.pooling == "last_position":  # the notebooks' call: the model numbers positions itself
            hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            pooled = hidden[:, -1]
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids).last_hidden_state
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        logits = self.score(pooled.to(self.score.weight.dtype))  # a bf16 base's hidden state, the fp32 head
        loss = None if labels is None else classification_loss(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def hidden_size(config) -> int:
    return getattr(config, "hidden_size", None) or config.n_embd


def decoder_head(config, num_labels: int, protocol: str = "standard") -> nn.Linear:
    if protocol == "curlora":
        torch.manual_seed(CURLORA_HEAD_SEED)
        return nn.Linear(hidden_size(config), num_labels, bias=True)
    head = nn.Linear(hidden_size(config), num_labels, bias=False)
    nn.init.normal_(head.weight, std=getattr(config, "initializer_range", 0.02))
    return head


def encoder_head(model: nn.Module, template: nn.Module, num_labels: int, protocol: str) -> nn.Module:
    """A fresh copy of the encoder's classification head with `num_labels` outputs."""
    if protocol == "curlora":
        raise LrbenchError("task.head_protocol=curlora replaces a causal LM's head; this model is an encoder "
                           "(use task.head_protocol=standard)")
    head = copy.deepcopy(template)
    linears = [(name, m) for name, m in head.named_modules() if isinstance(m, nn.Linear)]
    name, last = linears[-1]
    resized = nn.Linear(last.in_features, num_labels, bias=last.bias is not None)
    if name:
        parent, _, attr = name.rpartition(".")
        setattr(head.get_submodule(parent) if parent else head, attr, resized)
    else:
        head = resized
    for module in head.modules():
        model._init_weights(module)
    return head


class HeadBank:
    """One classification head per task, kept in `model.task_heads` (so they move, save and load with the
    model) and swapped into `model.<attr>` on demand."""

    def __init__(self, model: nn.Module, attr: str, protocol: str = "standard", poolings: dict | None = None):
        if protocol not in PROTOCOLS:
            raise LrbenchError(f"task.head_protocol={protocol!r}; valid: {choices(PROTOCOLS)}")
        if not hasattr(model, attr):
            raise LrbenchError(f"the model has no head module '{attr}' to swap per task")
        self.model, self.attr, self.protocol = model, attr, protocol
        self.poolings = dict(poolings or {})  # task -> pooling; a task not named reads its last real token
        bad = {name: p for name, p in self.poolings.items() if p not in POOLINGS}
        if bad:
            raise LrbenchError(f"pooling {bad}; valid: {choices(POOLINGS)}")
        if not isinstance(model, DecoderClassifier) and set(self.poolings.values()) - {"last_token"}:
            raise LrbenchError("pooling=last_position reads a causal LM's last position; this model is an encoder "
                               "(use pooling=last_token)")
        self.template = getattr(model, attr)
        model.task_heads = nn.ModuleDict()
        self.num_labels: dict[str, int] = {}

    def add(self, name: str, num_labels: int) -> list[nn.Parameter]:
        """Create task `name`'s head (seeded by the caller, or by the protocol) and return its parameters."""
        if isinstance(self.model, DecoderClassifier):
            head = decoder_head(self.model.config, num_labels, self.protocol)
        else:
            head = encoder_head(self.model, self.template, num_labels, self.protocol)
        device = next(self.template.parameters()).device
        self.model.task_heads[name] = head.to(device)
        self.num_labels[name] = num_labels
        return list(head.parameters())

    def use(self, name: str) -> None:
        setattr(self.model, self.attr, self.model.task_heads[name])
        if hasattr(self.model, "num_labels"):  # HF classifiers size their loss by it
            self.model.num_labels = self.num_labels[name]
        self.model.config.num_labels = self.num_labels[name]
        if isinstance(self.model, DecoderClassifier):
            self.model.pooling = self.poolings.get(name, "last_token")

    def __contains__(self, name: str) -> bool:
        return name in self.model.task_heads
