"""Turn a conversation into token ids, embedding slots and loss masks.

A sample becomes a flat sequence of positions. Each position is one of:

* text (``SLOT_TEXT``): a token id from the tokenizer;
* image (``SLOT_IMAGE``): visual token ``slot_pos`` of image ``slot_image`` (filled with
  ``adapter(feature)``); an image placed in a trained turn is a *target*: the hidden state of the
  position before each of its slots predicts that slot's encoder feature;
* task (``SLOT_TASK``): learnable task embedding ``slot_pos`` (``<task>`` expands to K of them);
* query (``SLOT_QUERY``): learnable query embedding ``slot_pos`` standing for visual token
  ``slot_pos`` of image ``slot_image`` (``-1``: an image to generate, no target); the hidden state
  *at* each query slot predicts that slot's token, so one forward pass reads a whole image.

``<image>`` renders as ``<Img>`` + N image slots + ``</Img>``, ``<query>`` as ``<Img>`` + N query
slots + ``</Img>`` (it takes the next image as its target, as ``<image>`` would in its turn).

The ``default`` template is the LM4LV reference's rendering, token for token: BOS, then the
prompt start ``### Human: `` (after ``{system}\n\n`` when a system prompt is given; left out for
``task_type: simple``) tokenised in one call, then each turn tokenised in one call:

* human: ``value\n### Assistant: `` as the first turn, ``Human: value\n### Assistant: `` after
  that, followed by the ``gpt_prefix``; never trained;
* gpt: ``value\n###``, all trained (no EOS); none: ``value\n``, trained;
* the open last turn of a generation prompt: its value alone.

Inside a turn ``<image>`` is written ``<Img><image></Img>``, and ``<image>`` / ``<task>`` /
``<query>`` are added tokens of a private copy of the tokenizer, so they split the text exactly as
the reference's added tokens do before they become slots. Generated text stops at ``###``.

The other templates (``vicuna_v1.1``, ``llama2``, ``simple``, ``chat_template``) put role
decorations around the values and tokenise every run of text between placeholders alone; only gpt
values (and the EOS that ends them) carry text loss, never human/none turns, templates or the
``gpt_prefix``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch

from ..config import TEMPLATES as TEMPLATE_NAMES  # (the templates below, and chat_template)
from ..errors import ConfigError
from .format import IMAGE_TOKEN, QUERY_TOKEN, TASK_TOKEN, Sample, Turn

IGNORE_INDEX = -100
SLOT_TEXT, SLOT_IMAGE, SLOT_TASK, SLOT_QUERY = 0, 1, 2, 3
IMG_START, IMG_END = "<Img>", "</Img>"
# added to the private tokenizer copy, as the reference adds them: they split the text, then become slots
ADDED_TOKENS = (IMAGE_TOKEN, QUERY_TOKEN, TASK_TOKEN)
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class Template:
    """Role decorations. ``end_with_eos``: the tokenizer's EOS closes every gpt answer (trained).

    ``reference``: rendered in the reference's form and units (module docstring): ``prompt_start``
    opens the conversation, ``human_prefix`` precedes every human turn but the first,
    ``human_suffix`` closes human turns and ``gpt_suffix`` gpt answers. ``stop``: strings that end
    generated text.
    """

    name: str
    system: str
    system_format: str
    human_prefix: str
    human_suffix: str
    gpt_header: str
    gpt_suffix: str
    end_with_eos: bool = True
    reference: bool = False
    prompt_start: str = ""
    stop: tuple[str, ...] = ()


TEMPLATES: dict[str, Template] = {
    "default": Template("default", "", "{system}\n\n", "Human: ", "\n### Assistant: ", "", "\n###",
                        end_with_eos=False, reference=True, prompt_start="### Human: ", stop=("###",)),
    "vicuna_v1.1": Template("vicuna_v1.1", VICUNA_SYSTEM, "{system}", " USER: ", "", " ASSISTANT: ", ""),
    "llama2": Template("llama2", "", "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n", "[INST] ", " [/INST]", " ", " "),
    "simple": Template("simple", "", "", "", "", "", "", end_with_eos=False),
}


@dataclass
class Piece:
    """A run of the rendered conversation, tokenised in one call. Text pieces of the ``default``
    template are whole turns and may hold ``<image>`` / ``<task>`` (trained turns: target images)."""

    kind: str  # "text" | "image" | "query" | "task" | "eos"
    text: str = ""
    trainable: bool = False  # text loss (text/eos) or target image (image, query)
    generated: bool = False  # query: the image to generate (generation prompts), no image of the sample


@dataclass
class Encoded:
    input_ids: torch.Tensor    # [L] token ids (pad id at slots)
    labels: torch.Tensor       # [L] token id where text loss applies, else IGNORE_INDEX
    slot_type: torch.Tensor    # [L] SLOT_TEXT | SLOT_IMAGE | SLOT_TASK | SLOT_QUERY
    slot_image: torch.Tensor   # [L] image index in the sample for image / query slots, else -1
    slot_pos: torch.Tensor     # [L] visual-token, task-token or query index, else 0
    image_is_target: torch.Tensor  # [num_images] bool
    text: str                  # the rendered text (slots shown as <image> / <query> / <task>)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def target_mask(self) -> torch.Tensor:
        """[L] bool: image slots whose feature is a training target."""
        return self._targets(SLOT_IMAGE)

    @property
    def query_mask(self) -> torch.Tensor:
        """[L] bool: query slots whose image is a training target (read at the slot itself)."""
        return self._targets(SLOT_QUERY)

    def _targets(self, kind: int) -> torch.Tensor:
        slots = (self.slot_type == kind) & (self.slot_image >= 0)
        tgt = torch.zeros_like(slots)
        if self.image_is_target.numel():
            tgt[slots] = self.image_is_target[self.slot_image[slots]]
        return tgt


_PLACEHOLDER = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(QUERY_TOKEN)}|{re.escape(TASK_TOKEN)})")


class SequenceBuilder:
    """Renders samples with a chat template and tokenises them into an ``Encoded`` sequence."""

    def __init__(self, tokenizer, *, template: str = "default", num_task_tokens: int = 10,
                 num_visual_tokens: int = 197, gpt_prefix: str = "", system_prompt: str | None = None):
        if template not in TEMPLATE_NAMES:
            raise ConfigError(f"unknown template {template!r}; valid: {', '.join(TEMPLATE_NAMES)}")
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
        self.template = TEMPLATES.get(template)
        self._cache: dict[str, list[int]] = {}
        self._turn_cache: dict[str, list[int]] = {}
        self._turn_tok = None
        self._added: dict[int, str] = {}

    @classmethod
    def for_model(cls, cfg, tokenizer, num_visual_tokens: int) -> "SequenceBuilder":
        """The sequence layout of a model of ``cfg`` (a ``ModelConfig``): its template, task
        tokens, gpt prefix and system prompt, with ``num_visual_tokens`` slots per image — the one
        layout the model, the prompt preview and the memory plan share."""
        return cls(tokenizer, template=cfg.template, num_task_tokens=cfg.num_task_tokens,
                   num_visual_tokens=num_visual_tokens, gpt_prefix=cfg.gpt_prefix, system_prompt=cfg.system_prompt)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Strings that end generated text (the ``default`` template's ``###``); EOS always does."""
        return self.template.stop if self.template is not None else ()

    @property
    def reference(self) -> bool:
        return self.template is not None and self.template.reference

    # ----------------------------------------------------------------- rendering
    def _expand(self, value: str, gpt: bool) -> list[Piece]:
        out: list[Piece] = []
        for part in _PLACEHOLDER.split(value):
            if part in (IMAGE_TOKEN, QUERY_TOKEN):
                kind = "image" if part == IMAGE_TOKEN else "query"
                out += [Piece("text", IMG_START, gpt), Piece(kind, trainable=gpt), Piece("text", IMG_END, gpt)]
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
        if self.reference:
            if generation and turns[-1].role == "human":
                turns.append(Turn("gpt", ""))
            return self._render_reference(sample.task_type == "simple", turns, generation)
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

    def _render_reference(self, simple: bool, turns: list[Turn], generation: bool) -> list[Piece]:
        """The reference's units: the prompt start, then one text piece per turn (module docstring)."""
        tpl = self.template
        pieces: list[Piece] = []
        if not simple:
            system = tpl.system_format.format(system=self.system_prompt) if self.system_prompt else ""
            pieces.append(Piece("text", system + tpl.prompt_start))
        for i, t in enumerate(turns):
            value = t.value.replace(IMAGE_TOKEN, IMG_START + IMAGE_TOKEN + IMG_END)
            value = value.replace(QUERY_TOKEN, IMG_START + QUERY_TOKEN + IMG_END)
            if t.role == "human":
                head = tpl.human_prefix if i else ""
                pieces.append(Piece("text", head + value + tpl.human_suffix + self.gpt_prefix))
            elif generation and i == len(turns) - 1:
                pieces.append(Piece("text", value))  # the open turn: generation continues it
            else:
                end = tpl.gpt_suffix if t.role == "gpt" else "\n"
                pieces.append(Piece("text", value + end, trainable=True))
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
        """Token ids of ``text`` tokenised alone with the model's tokenizer (no specials)."""
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            _remember(self._cache, text, ids)
        return ids

    def turn_ids(self, text: str) -> list[int]:
        """Token ids of a whole turn, tokenised in one call as the reference does: ``<image>``,
        ``<task>`` and ``<query>`` are added tokens of a private tokenizer copy (see ``added_token``)."""
        ids = self._turn_cache.get(text)
        if ids is None:
            ids = self._turn_tokenizer()(text, add_special_tokens=False)["input_ids"]
            _remember(self._turn_cache, text, ids)
        return ids

    def added_token(self, token_id: int) -> str | None:
        """The placeholder (``<image>`` | ``<task>`` | ``<query>``) a ``turn_ids`` id stands for."""
        self._turn_tokenizer()
        return self._added.get(token_id)

    def _turn_tokenizer(self):
        if self._turn_tok is None:
            tok = copy.deepcopy(self.tok)
            tok.add_tokens(list(ADDED_TOKENS))
            ids = {tok.convert_tokens_to_ids(t): t for t in ADDED_TOKENS}
            if len(ids) != len(ADDED_TOKENS) or None in ids or tok.unk_token_id in ids:
                raise ConfigError(f"the tokenizer cannot hold {', '.join(ADDED_TOKENS)} as added tokens")
            self._turn_tok, self._added = tok, ids
        return self._turn_tok

    def image_end_ids(self) -> list[int]:
        """Ids of ``</Img>`` as they follow an image's slots inside a sequence of this template."""
        if self.reference:
            ids = self.turn_ids(IMAGE_TOKEN + IMG_END)
            return ids[[self.added_token(i) for i in ids].index(IMAGE_TOKEN) + 1:]
        return self.text_ids(IMG_END)

    def encode(self, sample: Sample, *, generation: bool = False, image_only: bool = False,
               query: bool = False) -> Encoded:
        """Tokenise a sample. With ``image_only`` (generation), the answer is forced to open ``<Img>``
        (tokenised alone, as the reference's image-only generation does); with ``query`` too, N query
        slots without a target follow it: the image is read from them in one forward pass."""
        pieces = self.render(sample, generation=generation)
        if generation and image_only:
            pieces.append(Piece("text", IMG_START))
            if query:
                pieces.append(Piece("query", generated=True))
        seq = _Sequence(self.pad_id)
        shown: list[str] = []
        if self.bos_id is not None and self.template_name != "chat_template":
            seq.text([self.bos_id], False)
            shown.append(self.tok.bos_token or "")
        n_vis, n_task = self.num_visual_tokens, self.num_task_tokens
        for p in pieces:
            if p.kind == "eos":
                seq.text([self.eos_id], p.trainable)
                shown.append(self.tok.eos_token)
            elif p.kind == "image":
                seq.image(n_vis, p.trainable)
                shown.append(IMAGE_TOKEN)
            elif p.kind == "query":
                seq.query(n_vis, p.trainable, generated=p.generated)
                shown.append(QUERY_TOKEN)
            elif p.kind == "task":
                seq.task(n_task)
                shown.append(TASK_TOKEN)
            elif not self.reference:
                seq.text(self.text_ids(p.text), p.trainable)
                shown.append(p.text)
            else:
                run: list[int] = []
                for i in self.turn_ids(p.text) + [None]:
                    placeholder = self.added_token(i) if i is not None else None
                    if i is not None and placeholder is None:
                        run.append(i)
                        continue
                    seq.text(run, p.trainable)
                    run = []
                    if placeholder == IMAGE_TOKEN:
                        seq.image(n_vis, p.trainable)
                    elif placeholder == TASK_TOKEN:
                        seq.task(n_task)
                    elif placeholder == QUERY_TOKEN:
                        seq.query(n_vis, p.trainable)
                shown.append(p.text)
        if len(seq.targets) != len(sample.images):
            raise ConfigError(f"sample {sample.index}: rendered {len(seq.targets)} images but the sample has "
                              f"{len(sample.images)}")
        return seq.encoded("".join(shown))


def _remember(cache: dict, key: str, value: list[int], limit: int = 4096) -> None:
    """Cache ``value``; the cache is emptied when full (texts repeat within a dataset's templates)."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


class _Sequence:
    """Positions of a sequence under construction."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.stype: list[int] = []
        self.simg: list[int] = []
        self.spos: list[int] = []
        self.targets: list[bool] = []

    def _add(self, ids: list[int], labels: list[int], stype: int, simg: int, spos: list[int]) -> None:
        self.ids += ids
        self.labels += labels
        self.stype += [stype] * len(ids)
        self.simg += [simg] * len(ids)
        self.spos += spos

    def text(self, ids: list[int], trained: bool) -> None:
        self._add(ids, list(ids) if trained else [IGNORE_INDEX] * len(ids), SLOT_TEXT, -1, [0] * len(ids))

    def image(self, n: int, target: bool) -> None:
        self.targets.append(target)
        self._add([self.pad_id] * n, [IGNORE_INDEX] * n, SLOT_IMAGE, len(self.targets) - 1, list(range(n)))

    def query(self, n: int, target: bool, generated: bool = False) -> None:
        """N query slots: for the sample's next image (its target when ``target``), or, ``generated``,
        for an image to generate (no image of the sample)."""
        if not generated:
            self.targets.append(target)
        simg = -1 if generated else len(self.targets) - 1
        self._add([self.pad_id] * n, [IGNORE_INDEX] * n, SLOT_QUERY, simg, list(range(n)))

    def task(self, n: int) -> None:
        self._add([self.pad_id] * n, [IGNORE_INDEX] * n, SLOT_TASK, -1, list(range(n)))

    def encoded(self, text: str) -> Encoded:
        t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        return Encoded(t(self.ids), t(self.labels), t(self.stype), t(self.simg), t(self.spos),
                       torch.tensor(self.targets, dtype=torch.bool), text)
