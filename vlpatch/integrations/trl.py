"""TRL: `DataCollatorForVisionLanguageModeling` (SFTTrainer) and `DataCollatorForVisionPreference`
(DPOTrainer), whole media runs.

Which symbols and versions: `compat_matrix.yaml` (patches `trl.sft_collator`, `trl.dpo_collator`).
Upstream cuts image tokens: the messages / text path calls the processor with `truncation=True,
max_length=self.max_length`; the prompt/completion path (and the preference collator, for prompt +
chosen and prompt + rejected) concatenates the left-padded prompt and the completion, flushes left and
slices `[:, :max_length]`. Either way the kept text is the head of each row (the tokenizer's
`truncation_side` on the messages path).

The wrappers run upstream's `torch_call` with `max_length` unset, so the processor expands every image
and nothing is cut; then each row longer than `max_length` is cut by `core.fit_sequence` on the same
side with whole media runs, and the batch tensors are rebuilt (vlpatch/integrations/_collator.py, shared
with the Unsloth integration): input_ids, attention_mask, labels, completion_mask, token_type_ids,
mm_token_type_ids at the kept positions, padded on the right as upstream pads them; dropped examples and
removed images leave pixel_values / image_grid_thw. Preference pairs are decided together: the chosen
and rejected rows of one example are kept, cut, lose the same media, or are dropped as one.

TRL's own refusal of `truncation_mode="keep_end"` for vision datasets stays as it is (its check is in
the trainers' `__init__`, untouched). Media token layouts per processor class: the matrix (its
`processors:` section, shared with Unsloth's patches by class name); any other processor is left to
upstream (warned once).
"""

from __future__ import annotations

import functools

from ..errors import unreadable_media
from . import _collator

TRAINER = "trl"


EmptyBatchError = _collator.EmptyBatchError  # every example of a batch was dropped


def _site() -> _collator.CollatorPatch:
    return _collator.CollatorPatch(TRAINER, "max_length", "vlpatch.integrations.trl.filter_dataset(dataset, collator)")


# one CollatorPatch per patch (`trl.sft_collator`, `trl.dpo_collator`): each holds its own matrix options
SITES: dict = {}


def _uncovered(site: _collator.CollatorPatch, instance) -> bool:
    """No budget, or a processor the matrix has no token table for (left to upstream, warned once)."""
    return not getattr(instance, "max_length", None) or not site.covers(instance.processor, "TRL")


def _uncut(wrapped, instance, args, kwargs):
    """(upstream's batch with nothing cut, the budget, the examples' copies for policy shrink or None, `recollate`)."""
    examples = args[0] if args else kwargs["examples"]
    copies = _collator.copies_for_shrink(examples)  # policy shrink collates some examples again
    budget = instance.max_length

    def recollate(batch_examples):
        instance.max_length = None
        try:
            return wrapped(_collator.copies_for_shrink(batch_examples, always=True))
        finally:
            instance.max_length = budget

    instance.max_length = None
    try:
        return wrapped(*args, **kwargs), budget, copies, recollate
    finally:
        instance.max_length = budget


def _collate_sft(site: _collator.CollatorPatch, wrapped, instance, args, kwargs):
    """`DataCollatorForVisionLanguageModeling.torch_call`."""
    examples = args[0] if args else kwargs["examples"]
    if _uncovered(site, instance) or not examples:
        return wrapped(*args, **kwargs)
    first = examples[0]
    language_modeling = "messages" in first or getattr(instance, "dataset_text_field", "text") in first
    # later turns' media leave with the cut (read before upstream, which changes its examples in place)
    firsts = [_collator.first_turn_items(e) for e in examples] if language_modeling else None
    frames = _collator.chat_frames(examples) if language_modeling else None
    batch, budget, copies, recollate = _uncut(wrapped, instance, args, kwargs)
    keep = "head"
    if language_modeling:  # the processor cut on the tokenizer's truncation side; prompt/completion: the head
        tokenizer = getattr(instance.processor, "tokenizer", instance.processor)
        keep = "tail" if getattr(tokenizer, "truncation_side", "right") == "left" else "head"
    return site.fit(instance, batch, budget, keep=keep, pad_side="right", examples=copies, recollate=recollate,
                    firsts=firsts, frames=frames)


def _collate_dpo(site: _collator.CollatorPatch, wrapped, instance, args, kwargs):
    """`DataCollatorForVisionPreference.torch_call`: rows [chosen..., rejected...], one pair per example."""
    examples = args[0] if args else kwargs["examples"]
    if _uncovered(site, instance) or not examples:
        return wrapped(*args, **kwargs)
    frames = _collator.chat_frames(examples, key="prompt")  # both rows of a pair start with the prompt's frame
    batch, budget, copies, recollate = _uncut(wrapped, instance, args, kwargs)
    return site.fit(instance, batch, budget, keep="head", pairs=True, pad_side="right", examples=copies, recollate=recollate,
                    frames=frames)


def _copy(example):
    import copy

    return copy.deepcopy(example)  # TRL's collators change their examples in place (messages, `image`)


def filter_dataset(dataset, collator):
    """Keep the examples the patched TRL collator would not drop (same arithmetic, one example at a
    time), so that no batch ends up empty; each removed example gets a report row naming its dataset
    index (`"stage": "filter_dataset"`). Works on a `datasets.Dataset` or a list. Bad input (an
    unreadable image) is removed and reported too, up to VLPATCH_MAX_BAD of the examples."""
    return _site_of(collator).filter_dataset(dataset, collator, unreadable_media, prepare=_copy)


def _site_of(collator) -> _collator.CollatorPatch:
    """The CollatorPatch of the patch that wraps this collator's class (a subclass's too); the SFT one by default."""
    names = {cls.__name__ for cls in type(collator).__mro__}
    for site in SITES.values():
        if site.spec is not None and any(t.symbol.split(".")[0] in names for t in site.spec.targets if t.wrapper):
            return site
    return SITES.get("trl.sft_collator") or SITES.setdefault("trl.sft_collator", _site())


def details(spec) -> dict:
    return {"covered_processors": sorted(spec.options.get("media_tokens", {}))}


WRAPPERS = {"collate_sft": _collate_sft, "collate_dpo": _collate_dpo}


def wrappers(spec, version=None) -> dict:
    """The wrappers of patch `spec`, on its own CollatorPatch (its matrix options)."""
    site = SITES.setdefault(spec.id, _site())
    site.attach(spec)
    return {name: functools.partial(wrapper, site) for name, wrapper in WRAPPERS.items()}
