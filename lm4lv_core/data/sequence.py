"""Turn a conversation into token ids, embedding slots and loss masks.

A sample becomes a flat sequence of positions. Each position is one of:

* text (``SLOT_TEXT``): a token id from the tokenizer;
* image (``SLOT_IMAGE``): visual token ``slot_pos`` of image ``slot_image`` (filled with
  ``adapter(feature)``); an image placed in a gpt turn is a *target*: the hidden state of the
  position before each of its slots predicts that slot's encoder feature;
* task (``SLOT_TASK``): learnable task embedding ``slot_pos`` (``<task>`` expands to K of them).

``<image>`` renders as ``<Img>`` + N image slots + ``</Img>``. Text cross-entropy applies only to
gpt values (and the end-of-answer token), never to image slots, human/none turns, templates or
the ``gpt_prefix``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .format import IMAGE_TOKEN, TASK_TOKEN, Sample, Turn

IGNORE_INDEX = -100
SLOT_TEXT, SLOT_IMAGE, SLOT_TASK = 0, 1, 2
IMG_START, IMG_END = "<Img>", "</Img>"

DEFAULT_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the human's questions.")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class Template:
    """Role decorations. ``end_with_eos``: the tokenizer's EOS closes every gpt answer (trained)."""

    name: str
    system: str
    system_format: str
    human_prefix: str
    human_suffix: str
    gpt_header: str
    gpt_suffix: str
    end_with_eos: bool = True


TEMPLATES: dict[str, Template] = {
    "default": Template("default", DEFAULT_SYSTEM, "{system}\n", "### Human: ", "\n", "### Assistant: ", "\n"),
    "vicuna_v1.1": Template("vicuna_v1.1", VICUNA_SYSTEM, "{system}", " USER: ", "", " ASSISTANT: ", ""),
    "llama2": Template("llama2", "", "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n", "[INST] ", " [/INST]", " ", " "),
    "simple": Template("simple", "", "", "", "", "", "", end_with_eos=False),
}


@dataclass
class Piece:
    """A run of the rendered conversation before tokenisation."""

    kind: str  # "text" | "image" | "task" | "eos"
    text: str = ""
    trainable: bool = False  # text loss (text/eos) or target image (image)


@dataclass
class Encoded:
    input_ids: torch.Tensor    # [L] token ids (pad id at slots)
    labels: torch.Tensor       # [L] token id where text loss applies, else IGNORE_INDEX
    slot_type: torch.Tensor    # [L] SLOT_TEXT | SLOT_IMAGE | SLOT_TASK
    slot_image: torch.Tensor   # [L] image index in the sample for image slots, else -1
    slot_pos: torch.Tensor     # [L] visual-token index or task-token index, else 0
    image_is_target: torch.Tensor  # [num_images] bool
    text: str                  # human-readable rendering with slot counts

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def target_mask(self) -> torch.Tensor:
        """[L] bool: image slots whose feature is a training target."""
        is_img = self.slot_type == SLOT_IMAGE
        tgt = torch.zeros_like(is_img)
        if self.image_is_target.numel():
            tgt[is_img] = self.image_is_target[self.slot_image[is_img]]
        return tgt


_PLACEHOLDER = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(TASK_TOKEN)})")


class SequenceBuilder:
    """Renders samples with a chat template and tokenises them into an ``Encoded`` sequence."""

    def __init__(self, tokenizer, *, template: str = "default", num_task_tokens: int = 10,
                 num_visual_tokens: int = 197, gpt_prefix: str = "", system_prompt: str | None = None):
        if template != "chat_template" and template not in TEMPLATES:
            raise ConfigError(f"unknown template {template!r}; valid: {', '.join([*TEMPLATES, 'chat_template'])}")
        if template == "chat_template" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("template 'chat_template' needs a tokenizer with a chat template")
        self.tok = tokenizer
        self.template_name = template
        self.num_task_tokens = num_task_tokens
        self.num_visual_tokens = num_visual_tokens
        self.gpt_prefix = gpt_prefix
        self.system_prompt = system_prompt
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        self._cache: dict[str, list[int]] = {}

    # ----------------------------------------------------------------- rendering
    def _expand(self, value: str, gpt: bool) -> list[Piece]:
        out: list[Piece] = []
        for part in _PLACEHOLDER.split(value):
            if part == IMAGE_TOKEN:
                out += [Piece("text", IMG_START, gpt), Piece("image", trainable=gpt),
                        Piece("text", IMG_END, gpt)]
            elif part == TASK_TOKEN:
                out.append(Piece("task"))
            elif part:
                out.append(Piece("text", part, gpt))
        return out

    def _gpt_answer(self, value: str, tpl_suffix: str, eos: bool, open_end: bool) -> list[Piece]:
        pieces = [Piece("text", self.gpt_prefix)] if self.gpt_prefix else []
        if open_end:
            return pieces
        pieces += self._expand(value, gpt=True)
        if eos and self.eos_id is not None:
            pieces.append(Piece("eos", trainable=True))
        if tpl_suffix:
            pieces.append(Piece("text", tpl_suffix))
        return pieces

    def render(self, sample: Sample, *, generation: bool = False) -> list[Piece]:
        """Pieces of the whole conversation; with ``generation`` the last (empty) gpt turn stays open."""
        turns = list(sample.turns)
        if generation and turns[-1].role != "gpt":
            turns.append(Turn("gpt", ""))
        if self.template_name == "chat_template":
            return self._render_chat_template(turns, generation)
        simple = sample.task_type == "simple"
        tpl = TEMPLATES["simple" if simple else self.template_name]
        pieces: list[Piece] = []
        system = self.system_prompt if self.system_prompt is not None else tpl.system
        if system and tpl.system_format:
            pieces.append(Piece("text", tpl.system_format.format(system=system)))
        first_human = True
        for i, t in enumerate(turns):
            last = i == len(turns) - 1
            if t.role == "none":
                pieces += self._expand(t.value, gpt=False)
            elif t.role == "human":
                prefix = tpl.human_prefix
                if tpl.name == "llama2" and first_human and system:
                    prefix = ""  # the system block already opened the [INST]
                first_human = False
                pieces += [Piece("text", prefix)] if prefix else []
                pieces += self._expand(t.value, gpt=False)
                pieces += [Piece("text", tpl.human_suffix)] if tpl.human_suffix else []
            else:
                pieces += [Piece("text", tpl.gpt_header)] if tpl.gpt_header else []
                pieces += self._gpt_answer(t.value, tpl.gpt_suffix, tpl.end_with_eos,
                                           open_end=generation and last)
        return pieces

    def _render_chat_template(self, turns: list[Turn], generation: bool) -> list[Piece]:
        msgs, values = [], []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        open_end = generation and turns[-1].role == "gpt" and turns[-1].value == ""
        body = turns[:-1] if open_end else turns
        for i, t in enumerate(body):
            role = {"human": "user", "gpt": "assistant", "none": "user"}[t.role]
            msgs.append({"role": role, "content": f"\ue000{i}\ue001"})
            values.append(t)
        rendered = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=open_end)
        pieces: list[Piece] = []
        for part in re.split(r"(\ue000\d+\ue001)", rendered):
            m = re.fullmatch(r"\ue000(\d+)\ue001", part)
            if m:
                t = values[int(m.group(1))]
                if t.role == "gpt":
                    pieces += [Piece("text", self.gpt_prefix)] if self.gpt_prefix else []
                pieces += self._expand(t.value, gpt=t.role == "gpt")
            elif part:
                pieces.append(Piece("text", part))
        if open_end and self.gpt_prefix:
            pieces.append(Piece("text", self.gpt_prefix))
        return pieces

    # ---------------------------------------------------------------- tokenising
    def text_ids(self, text: str) -> list[int]:
        """Token ids of a text piece, exactly as it is tokenised inside a sequence (no specials)."""
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            self._cache[text] = ids
        return ids

    def encode(self, sample: Sample, *, generation: bool = False, image_only: bool = False) -> Encoded:
        """Tokenise a sample. With ``image_only`` (generation), the answer is forced to open ``<Img>``."""
        pieces = self.render(sample, generation=generation)
        if generation and image_only:
            pieces.append(Piece("text", IMG_START))
        ids: list[int] = []
        labels: list[int] = []
        stype: list[int] = []
        simg: list[int] = []
        spos: list[int] = []
        targets: list[bool] = []
        shown: list[str] = []
        if self.bos_id is not None and self.template_name != "chat_template":
            ids.append(self.bos_id), labels.append(IGNORE_INDEX), stype.append(SLOT_TEXT)
            simg.append(-1), spos.append(0)
            shown.append(self.tok.bos_token or "")
        n_vis, n_task = self.num_visual_tokens, self.num_task_tokens
        for p in pieces:
            if p.kind in ("text", "eos"):
                toks = [self.eos_id] if p.kind == "eos" else self.text_ids(p.text)
                ids += toks
                labels += toks if p.trainable else [IGNORE_INDEX] * len(toks)
                stype += [SLOT_TEXT] * len(toks)
                simg += [-1] * len(toks)
                spos += [0] * len(toks)
                shown.append(self.tok.eos_token if p.kind == "eos" else p.text)
            elif p.kind == "image":
                k = len(targets)
                targets.append(p.trainable)
                ids += [self.pad_id] * n_vis
                labels += [IGNORE_INDEX] * n_vis
                stype += [SLOT_IMAGE] * n_vis
                simg += [k] * n_vis
                spos += list(range(n_vis))
                shown.append(f"[image {k}: {n_vis} slots{', target' if p.trainable else ''}]")
            else:
                ids += [self.pad_id] * n_task
                labels += [IGNORE_INDEX] * n_task
                stype += [SLOT_TASK] * n_task
                simg += [-1] * n_task
                spos += list(range(n_task))
                shown.append(f"[task: {n_task} slots]")
        if len(targets) != len(sample.images):
            raise ConfigError(f"sample {sample.index}: rendered {len(targets)} images but the sample has "
                              f"{len(sample.images)}")
        t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        return Encoded(t(ids), t(labels), t(stype), t(simg), t(spos),
                       torch.tensor(targets, dtype=torch.bool), "".join(shown))
