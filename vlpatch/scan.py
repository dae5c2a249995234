"""`vlpatch scan`: what LLaMA-Factory would do with each sample, before training, without the model.

The training config is read by LLaMA-Factory's own `get_train_args` (as `llamafactory-cli train`
reads it), the tokenizer and processor are loaded (no weights), the datasets are loaded and aligned by
LLaMA-Factory's own loader, and every sample goes through LLaMA-Factory's own dataset processor, with
image token counts from image headers (`llamafactory.header_tokens`, where it is exact; upstream's
path elsewhere). Three passes of the real code: the whole sample (no cut), vanilla at `cutoff_len`
(does the cut go through media?), and vlpatch at `cutoff_len` under the policy (its report rows).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field

from . import core


class ScanSetupError(Exception):
    """The config, model files or datasets could not be loaded: one line for the user, exit code 2."""
KEEP_SHARES = (0.9, 0.95, 0.99, 1.0)


POLICIES = core.POLICY_NAMES  # the side-by-side table: outcome under each

@dataclass
class Sample:
    index: int
    source_dataset: str | None = None  # the dataset of the config it came from
    source_row: int | None = None  # its row there, as the user's file numbers it
    tokens: int | None = None  # whole sample, nothing cut
    text_tokens: int | None = None
    media_tokens: dict = field(default_factory=dict)  # kind -> tokens per item, in order
    images: list = field(default_factory=list)
    vanilla: str = ""  # fits | text truncated | crash: ... | error: ...
    vlpatch: str = ""  # fits | truncated | media_dropped | dropped | error: ...  (under the scan's policy)
    detail: str = ""
    policies: dict = field(default_factory=dict)  # the outcome under each policy: drop, drop_media, shrink, error
    # a row vlpatch cuts, as training gets it (the scan's policy): its start and the tokens before its answer
    preview: dict = field(default_factory=dict)


def _scratch_dir(prefix: str) -> str:
    """A temporary directory, removed when the process exits (every scan made one that stayed in /tmp)."""
    import atexit
    import shutil

    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


def _train_args(config: dict):
    from llamafactory.hparams import get_train_args

    args = dict(config)
    for key in ("deepspeed", "fsdp", "fsdp_config"):  # nothing is trained: no launcher settings
        args.pop(key, None)
    args.update(bf16=False, fp16=False, report_to="none", do_train=True, overwrite_cache=True)
    args.setdefault("stage", "sft")
    args.setdefault("finetuning_type", "full")
    if not args.get("output_dir"):
        args["output_dir"] = _scratch_dir("vlpatch-scan-")  # nothing is written there
    out = get_train_args(args)
    return out[0], out[1], out[2], out[3]


def _media_counts(runs) -> dict:
    """kind -> [tokens of each item's span]."""
    out: dict = {}
    for run in runs:
        out.setdefault(run.kind, []).append(run.length)
    return out


def scan(config: dict, policy: str = "drop", limit: int | None = None, progress=False, workers: int | None = None) -> dict:
    """`progress`: False, True (a bar on stderr) or a stream for the bar. `workers`: processes that
    share the samples (default: the config's preprocessing_num_workers, else 1)."""
    import vlpatch
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.data import loader
    from llamafactory.model import load_tokenizer

    from .integrations import llamafactory as lf_integration

    step = "reading the config"
    try:
        model_args, data_args, training_args, finetuning_args = _train_args(config)
        stage = finetuning_args.stage
        step = f"loading the tokenizer and processor of {model_args.model_name_or_path}"
        loaded = load_tokenizer(model_args)
        tokenizer, mm_processor = loaded["tokenizer"], loaded["processor"]
        template = get_template_and_fix_tokenizer(tokenizer, data_args)
        step = f"loading the dataset {data_args.dataset}"
        vlpatch.revert()
        vlpatch.apply(patches=["llamafactory.truncation"])  # rows carry their dataset and file row
        try:
            dataset = loader._get_merged_dataset(data_args.dataset, model_args, data_args, training_args, stage)
        finally:
            vlpatch.revert()
        processor = loader._get_dataset_processor(data_args, stage, template, tokenizer, mm_processor)
    except (Exception, SystemExit) as exc:  # LLaMA-Factory's argument parser may exit
        if isinstance(exc, vlpatch.VLPatchError):
            raise
        text = str(exc).strip().splitlines()
        raise ScanSetupError(f"{step}: {type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")) from exc
    cutoff = data_args.cutoff_len
    n = len(dataset) if limit is None else min(limit, len(dataset))
    workers = max(1, min(workers or getattr(data_args, "preprocessing_num_workers", None) or 1, n or 1))
    state = _State(dataset, list(dataset.column_names), processor, data_args, template, tokenizer, cutoff, policy)
    bar = _progress(n, progress)
    try:
        if workers == 1:
            samples = _scan_chunk(state, range(n), _Ticker(bar))
        else:  # chunks of a few blocks, handed out as workers free up: a worker whose samples are longer takes fewer
            step = WORKER_CHUNK if n > 2 * workers * WORKER_CHUNK else max(1, -(-n // workers))
            samples = _in_workers(state, [range(k, min(n, k + step)) for k in range(0, n, step)], workers, bar)
    finally:
        vlpatch.revert()
        if bar:
            bar.close()
    from .engine import Config

    max_bad = Config.from_env().max_bad
    bad = sum(1 for s in samples if "bad_input" in f"{s.vlpatch} {s.detail}")
    return {
        # training stops before it starts when bad input exceeds VLPATCH_MAX_BAD (policies drop / drop_media)
        "bad_input": {"samples": bad, "of": len(samples), "max_bad": max_bad,
                      "training_stops": not core.get_policy(policy).stops and core.too_much_bad(bad, len(samples), max_bad)},
        "config": {"dataset": data_args.dataset, "template": data_args.template, "cutoff_len": cutoff, "policy": policy,
                   "image_max_pixels": getattr(model_args, "image_max_pixels", None),
                   "image_min_pixels": getattr(model_args, "image_min_pixels", None)},
        "workers": workers,
        "samples": [asdict(s) for s in samples],
        "recommend": recommend(samples, cutoff, mm_processor, model_args),
    }


@dataclass
class _State:
    """What every pass needs; worker processes inherit it (fork) and read rows from the dataset lazily,
    so memory stays flat in the number of samples."""

    dataset: object
    columns: list
    processor: object
    data_args: object
    template: object
    tokenizer: object
    cutoff: int
    policy: str


class _Ticker:
    """Progress in passes: a tqdm bar in this process, or counters shared with the parent's bar."""

    def __init__(self, bar=None, done=None, total=None):
        self.bar, self.done, self.total = bar, done, total

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if self.done is not None:
            with self.done.get_lock():
                self.done.value += 1

    def more(self, k: int) -> None:  # passes found to be needed after pass 1
        if self.bar is not None:
            self.bar.total += k
            self.bar.refresh()
        if self.total is not None:
            with self.total.get_lock():
                self.total.value += k


# the samples go through the passes this many at a time, each block through all of them (the policy passes
# share each sample's uncut encode, lf_integration.sharing; every pass reuses the first's tokenized texts): memory
# stays bounded however large the dataset
SHARED_BLOCK = 64
WORKER_CHUNK = 4 * SHARED_BLOCK  # samples a worker process takes at a time (`--workers` 2 or more)


def _counts(ids, tokens) -> Counter:
    """How many of each of `tokens` `ids` holds (those it holds)."""
    every = Counter(ids)
    return Counter({t: every[t] for t in tokens if every[t]})


class _Encoder:
    """One pass over one sample through the real dataset processor, at a given cutoff_len."""

    def __init__(self, state: _State, ticker: _Ticker):
        self.state, self.ticker = state, ticker
        self.block: dict = {}  # index -> its dataset row, for the block in the passes: read once (a read costs
        # about as much as vlpatch's own work on a sample), handed to each pass as a copy (a pass may edit its lists)

    def read(self, i) -> dict:
        row = self.block.get(i)
        if row is None:
            return self.state.dataset[i]
        return {k: [dict(m) if isinstance(m, dict) else m for m in v] if isinstance(v, list) else v for k, v in row.items()}

    def __call__(self, i, length, processor=None, rows=None):
        """The sample's first sequence (input_ids, or a pair's chosen), or None; `rows` gets upstream's output."""
        state = self.state
        row = self.read(i)
        state.data_args.cutoff_len = length
        try:
            out = (processor or state.processor).preprocess_dataset({c: [row.get(c)] for c in state.columns})
        finally:
            state.data_args.cutoff_len = state.cutoff
            self.ticker.tick()  # a pass that raised is done too
        if rows is not None:
            rows.append(out)
        ids = out.get("input_ids") or out.get("chosen_input_ids")  # sft / pt / kto, or rm / dpo pairs
        return ids[0] if ids else None


class _TextMemo:
    """The scan's tokenizer remembers what it tokenized: each sample goes through the same template
    several times (whole, vanilla at cutoff_len, vlpatch's passes), and `tokenizer.encode` of one text
    with the same arguments gives the same ids. At most `limit` texts, then it starts afresh."""

    def __init__(self, tokenizer, limit: int = 16384):
        self.tokenizer, self.limit, self.memo = tokenizer, limit, {}
        self.encode = tokenizer.encode
        self.own = tokenizer.__dict__.get("encode")  # an encode the tokenizer object itself holds: put back

    def __call__(self, text, *args, **kwargs):
        try:
            key = (text, args, tuple(sorted(kwargs.items())))
            hit = self.memo.get(key)
        except TypeError:  # an argument that cannot be a key: not remembered
            return self.encode(text, *args, **kwargs)
        if hit is None:
            out = self.encode(text, *args, **kwargs)
            if not isinstance(out, list):
                return out
            if len(self.memo) >= self.limit:
                self.memo.clear()
            hit = self.memo[key] = tuple(out)
        return list(hit)

    def __enter__(self):
        self.tokenizer.encode = self
        return self

    def __exit__(self, *exc):
        if self.own is None:
            self.tokenizer.__dict__.pop("encode", None)
        else:
            self.tokenizer.encode = self.own


def _scan_chunk(state: _State, indices, ticker: _Ticker) -> list:
    """The passes over some samples, in this process, a block at a time: the whole sample, vanilla at
    cutoff_len, vlpatch at cutoff_len under the policy (and under the others, for the per-policy table).
    Returns their `Sample`s."""
    from .integrations import llamafactory as lf_integration

    encode = _Encoder(state, ticker)
    samples: list = []
    indices = list(indices)
    with _TextMemo(state.tokenizer):
        for start in range(0, len(indices), SHARED_BLOCK):
            samples.extend(_scan_block(state, indices[start : start + SHARED_BLOCK], encode, ticker, lf_integration))
    return samples


def _scan_block(state: _State, indices, encode: _Encoder, ticker: _Ticker, lf_integration) -> list:
    import vlpatch

    from . import report as vreport

    samples = []
    encode.block = {}
    for i in indices:
        row = encode.block[i] = state.dataset[i]
        source, source_row = row.get(lf_integration.SOURCE_COLUMN), row.get(lf_integration.ROW_COLUMN)
        samples.append(Sample(i, source, source_row, images=list(row.get("_images") or [])))
    outcomes: dict = {}
    with lf_integration.sharing():  # the passes share each over-long sample's uncut encode and spans (the whole pass's)
        vlpatch.revert()  # apply() publishes each pass's settings; revert() puts the environment back
        vlpatch.apply(patches=["llamafactory.header_tokens"])
        import llamafactory.data.mm_plugin  # noqa: F401  (attach now)

        long, bad, marks = _whole_pass(state, samples, encode, lf_integration)
        ticker.more(2 * len(long) + len(bad))  # over-long samples: two more passes; bad ones: one
        _vanilla_pass(state, long, marks, encode)
        vlpatch.revert()
        # pass 3, under the policy training will use, then under the other policies for the side-by-side table
        # (`error` stops training where `drop` drops: its outcome follows from drop's)
        policies = list(dict.fromkeys([state.policy, *(p for p in POLICIES if not core.get_policy(p).stops)]))
        ticker.more((len(policies) - 1) * (len(long) + len(bad)))
        for policy in policies:
            outcomes[policy] = _policy_pass(state, long + bad, policy, encode, lf_integration, vreport)
    for s in samples:
        if s.index not in outcomes[state.policy]:
            s.policies = {p: "fits" for p in POLICIES}
            continue
        s.vlpatch, reason = outcomes[state.policy][s.index]
        if reason:
            s.detail = (s.detail + "; " if s.detail else "") + reason
        drop = outcomes["drop"][s.index][0]
        s.policies = {"drop": drop, "drop_media": outcomes["drop_media"][s.index][0],
                      "shrink": outcomes["shrink"][s.index][0], "error": "error" if drop == "dropped" else drop}
    return samples


def _whole_pass(state: _State, samples: list, encode: _Encoder, lf_integration) -> tuple:
    """Pass 1: each sample whole, its media spans learned from the plugin. Returns (the over-long
    samples, those that failed, {index: (media tokens the plugin wrote, how many of each)})."""
    long, bad, marks = [], [], {}
    for s in samples:
        try:
            with lf_integration.tracing(state.processor) as (recording, trace):
                ids = encode(s.index, core.UNBOUNDED, recording)
        except Exception as exc:  # vanilla training dies on it; pass 3 asks vlpatch what it does
            s.vanilla = f"error: {type(exc).__name__}: {exc}"[:300]
            bad.append(s)
            continue
        s.tokens = len(ids)
        try:
            runs, found = lf_integration.media_runs(state.processor, trace, ids)
        except (lf_integration.Unreadable, ValueError) as exc:
            runs, found = [], None
            s.detail = f"media spans not readable: {exc}"
        s.media_tokens = _media_counts(runs)
        s.text_tokens = s.tokens - core.run_tokens(runs)
        if s.tokens <= state.cutoff:
            s.vanilla = s.vlpatch = "fits"
        else:
            long.append(s)
            if found is not None:
                marks[s.index] = (found, _counts(ids, found))
                lf_integration.share(state.processor, trace)  # the policy passes start from this encode
    return long, bad, marks


def _vanilla_pass(state: _State, long: list, marks: dict, encode: _Encoder) -> None:
    """Pass 2: the over-long samples as upstream cuts them at cutoff_len: does the cut go through media?"""
    for s in long:
        try:
            ids = encode(s.index, state.cutoff)
            if s.index not in marks:
                s.vanilla = "text truncated (media not checked: spans not readable)"
                continue
            found, full = marks[s.index]
            kept = _counts(ids, found)
            if kept == full:
                s.vanilla = "text truncated"
            else:  # upstream still hands every media item to the model: a lost media token is a crash
                s.vanilla = "crash: media tokens cut"
                s.detail = f"vanilla keeps {sum(kept.values())} of {sum(full.values())} media tokens"
        except Exception as exc:
            s.vanilla = f"error: {type(exc).__name__}: {exc}"[:300]


def _policy_pass(state, todo, policy, encode, lf_integration, vreport) -> dict:
    """index -> (vlpatch's outcome at cutoff_len under `policy`, its reason) for the samples `todo`."""
    import logging

    import vlpatch

    scratch = tempfile.mkdtemp(prefix="vlpatch-scan-")
    path = os.path.join(scratch, "report.jsonl")
    # shrink writes its downsized images into a scratch directory: the scan changes nothing of the user's
    vlpatch.apply(policy=policy, patches=["llamafactory.header_tokens", "llamafactory.truncation"], report=path,
                  shrink_dir=os.path.join(scratch, "media"))
    quiet = logging.getLogger("vlpatch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    offset = 0  # rows are appended: read only what each sample added

    def new_rows():
        nonlocal offset
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as fh:
            fh.seek(offset)
            text = fh.read()
            offset = fh.tell()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    out = {}
    try:
        for s in todo:  # vlpatch at cutoff_len (bad input: what training does with it)
            run = vreport.start_run(lf_integration.TRAINER, "scan", path, tallies=False)  # the sample's rows say it all
            try:
                got: list = []
                encode(s.index, state.cutoff, rows=got)
                mine = [r for r in new_rows() if r.get("run_id") == run.run_id]
                outcome = mine[-1]["action"] if mine else ("fits" if s.tokens is not None else "kept")
                out[s.index] = (outcome, str(mine[-1]["reason"]) if mine and mine[-1].get("reason") else "")
                if policy == state.policy and outcome in ("truncated", "media_dropped", "shrunk") and got:
                    s.preview = preview(state.processor.tokenizer, got[0])
            except Exception as exc:
                out[s.index] = (f"error: {type(exc).__name__}: {exc}"[:300], "")
            finally:
                vreport.end_run(run, quiet=True)
    finally:
        quiet.setLevel(level)
        vlpatch.revert()
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return out


def preview(tokenizer, out: dict, start: int = 32, before: int = 12) -> dict:
    """A cut row as training gets it: its first `start` tokens and the `before` tokens ahead of its
    answer (the first supervised token), decoded, a token repeated 3 times or more shown once with its
    count (`<|image_pad|> x64`). Shows the chat frame a cut row keeps at its start, and whether the
    assistant header still precedes the answer (LLaMA-Factory cuts a prompt from its end, header
    included; vlpatch keeps that: docs/policies.md, what a cut row keeps)."""
    ids = (out.get("input_ids") or out.get("chosen_input_ids") or [[]])[0]
    labels = (out.get("labels") or out.get("chosen_labels") or [[]])[0]
    answer = next((k for k, label in enumerate(labels) if label != -100), None) if len(labels) == len(ids) else None
    got = {"row_start": readable(tokenizer, ids[:start])}
    if answer is not None:
        got["before_answer"] = readable(tokenizer, ids[max(0, answer - before) : answer])
    return got


def readable(tokenizer, ids) -> str:
    parts, plain, i = [], [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and ids[j] == ids[i]:
            j += 1
        if j - i >= 3:
            if plain:
                parts.append(tokenizer.decode(plain))
                plain = []
            parts.append(f"{tokenizer.decode([ids[i]])} x{j - i}")
        else:
            plain.extend(ids[i:j])
        i = j
    if plain:
        parts.append(tokenizer.decode(plain))
    return "".join(parts)


_worker_state: _State | None = None
_worker_ticker: _Ticker | None = None


def _worker(indices) -> list:
    return [asdict(s) for s in _scan_chunk(_worker_state, indices, _worker_ticker)]


def _share_of_cores(workers: int) -> None:
    """A worker's torch (the image processors' ops) runs on its share of the cores, at least one thread: with
    torch's default, a thread per core in every worker would spin on the cores the others use (as the test
    sessions' torch did before OMP_NUM_THREADS=1; docs/performance.md has the scan's figures)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _in_workers(state: _State, chunks: list, workers: int, bar) -> list:
    """`workers` forked processes take the chunks in turn (they inherit the loaded tokenizer, processor and
    dataset, as datasets' own `num_proc` workers do); the parent draws one progress bar over all of them."""
    import multiprocessing
    import time

    global _worker_state, _worker_ticker
    ctx = multiprocessing.get_context("fork")
    done, total = ctx.Value("q", 0), ctx.Value("q", sum(len(c) for c in chunks))
    _worker_state, _worker_ticker = state, _Ticker(None, done, total)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer was used before the fork
    try:
        with ctx.Pool(workers, initializer=_share_of_cores, initargs=(workers,)) as pool:
            result = pool.map_async(_worker, chunks, chunksize=1)
            while not result.ready():
                result.wait(0.2)
                if bar is not None:
                    bar.total, bar.n = total.value, done.value
                    bar.refresh()
            parts = result.get()
    finally:
        _worker_state = _worker_ticker = None
    if bar is not None:
        bar.total, bar.n = total.value, done.value
        bar.refresh()
    return [Sample(**d) for part in parts for d in part]


def _progress(total: int, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="vlpatch scan", file=sys.stderr if enabled is True else enabled, unit="pass")
    except ImportError:  # pragma: no cover
        return None


def _percentile(ordered: list, share: float) -> int:
    """The smallest value at or below which `share` of the (sorted) values lie."""
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def recommend(samples, cutoff: int, mm_processor, model_args) -> dict:
    lengths = sorted(s.tokens for s in samples if s.tokens is not None)
    left_out = [s.index for s in samples if s.tokens is None]
    # bad input has no length: the figures cover the samples that could be read, and say so
    out: dict = {"covers": len(lengths), "of": len(samples), "left_out": left_out, "cutoff_len_for_share": {}}
    for share in KEEP_SHARES:
        if lengths:
            out["cutoff_len_for_share"][str(share)] = _percentile(lengths, share)
    out["image_max_pixels_for_cutoff"] = _max_pixels_for(samples, cutoff, mm_processor, model_args)
    out["media"] = _media_levers(samples, model_args)
    return out


# the LLaMA-Factory settings that decide how many tokens a media kind takes
LEVERS = {
    "image": ("image_max_pixels", "image_min_pixels"),
    "video": ("video_max_pixels", "video_maxlen", "video_fps"),
    "audio": (),
}
HOW_COUNTED = {
    "image": "from image headers where the file can vouch (Qwen-VL plugins), else LLaMA-Factory's own processing",
    "video": "LLaMA-Factory's own processing (frames decoded as in training)",
    "audio": "LLaMA-Factory's own processing (audio read as in training)",
}


def _media_levers(samples, model_args) -> dict:
    """Per media kind in the data: items, tokens per item, how they were counted, and the settings
    that change them (with their values in this config)."""
    out = {}
    for kind in ("image", "video", "audio"):
        sizes = [n for s in samples for n in (s.media_tokens or {}).get(kind, [])]
        if not sizes:
            continue
        out[kind] = {
            "items": len(sizes),
            "max_tokens": max(sizes),
            "counted": HOW_COUNTED[kind],
            "levers": {name: getattr(model_args, name, None) for name in LEVERS[kind]},
        }
    return out


def _not_images(s) -> int:
    """Tokens of a sample's videos and audio: image_max_pixels does not change them."""
    return sum(sum(v) for kind, v in (s.media_tokens or {}).items() if kind != "image")


def _max_pixels_for(samples, cutoff: int, mm_processor, model_args) -> dict:
    """The largest image_max_pixels (a square side in steps of 28 px, from the configured one down) at
    which every sample fits cutoff_len, for Qwen-VL image processors (header arithmetic)."""
    from . import tokens
    from .integrations import lf_header

    if not any(s.images for s in samples if s.tokens is not None):
        return {"value": None, "why": "no images in these samples"}
    ip = getattr(mm_processor, "image_processor", None)
    geometry = lf_header.geometry(ip) if ip is not None else None
    if geometry is None:
        return {"value": None, "why": "only for Qwen-VL image processors"}
    patch, merge, lo, hi = geometry
    vision = tokens.QwenVision(patch, merge, lo, hi)
    current = getattr(model_args, "image_max_pixels", 768 * 768)
    min_pixels = getattr(model_args, "image_min_pixels", 32 * 32)
    text_only = [s.index for s in samples if s.tokens is not None and s.text_tokens + _not_images(s) + 2 * len(s.images) > cutoff]
    skip = set(text_only)
    candidates = [side * side for side in range(int(math.isqrt(current)) // 28 * 28, 27, -28)]
    headers = {}
    for s in samples:
        if s.tokens is None:
            continue  # an error entry already
        for path in s.images:
            if path not in headers:
                headers[path] = tokens.image_header(path)  # None: not a plain file it can vouch for
    if any(h is None for h in headers.values()):
        return {"value": None, "why": "some images are not plain files the header can vouch for"}
    for pixels in [current, *candidates]:
        worst = 0
        for s in samples:
            if s.tokens is None or s.index in skip:
                continue
            try:
                media = _not_images(s) + sum(vision.image_tokens(*tokens.lf_preprocess_size(*headers[p], pixels, min_pixels)) + 2 for p in s.images)
            except ValueError:  # an extreme strip shrinks to nothing: upstream fails too
                return {"value": None, "why": f"at image_max_pixels {pixels} an image of sample {s.index} shrinks to nothing "
                        "(LLaMA-Factory fails on it), and no larger value fits",
                        "text_alone_too_long": text_only}
            worst = max(worst, s.text_tokens + media)
        if worst <= cutoff:
            return {"value": pixels, "side": math.isqrt(pixels), "text_alone_too_long": text_only}
    return {"value": None, "why": "no image_max_pixels down to 28x28 fits every sample", "text_alone_too_long": text_only}


def summary(result: dict) -> str:
    """The scan's report for a person: outcomes with and without vlpatch, per policy, token lengths, the
    recommended settings, a cut row's start and the bad input."""
    samples, cfg = result["samples"], result["config"]
    workers = result.get("workers", 1)
    lines = [f"vlpatch scan: {len(samples)} samples of {cfg['dataset']} (template {cfg['template']}, cutoff_len {cfg['cutoff_len']}, "
             f"policy {cfg['policy']}{f', {workers} workers' if workers > 1 else ''})", ""]
    lines += _outcome_lines(samples)
    lines += _length_lines(samples, cfg["cutoff_len"])
    lines += _recommend_lines(result["recommend"], cfg["cutoff_len"])
    lines += _preview_lines(samples)
    lines += _bad_input_lines(samples, cfg["policy"], result.get("bad_input") or {})
    return "\n".join(lines)


def _outcome_lines(samples: list) -> list:
    """Each outcome's count without and with vlpatch, then under each policy."""
    lines = ["outcome                          without vlpatch   with vlpatch"]
    van = Counter(_bucket(s["vanilla"]) for s in samples)
    pat = Counter(_bucket(s["vlpatch"]) for s in samples)
    for key in sorted(set(van) | set(pat), key=lambda k: -(van[k] + pat[k])):
        lines.append(f"  {key:31} {van.get(key, 0):>15}   {pat.get(key, 0):>12}")
    per = {p: Counter(_bucket((s.get("policies") or {}).get(p, "")) for s in samples) for p in POLICIES}
    keys = sorted({k for c in per.values() for k in c if k}, key=lambda k: -sum(c[k] for c in per.values()))
    if keys:
        lines += ["", "with vlpatch, per policy             drop   drop_media   shrink   error"]
        for key in keys:
            lines.append(f"  {key:31} {per['drop'][key]:>6}   {per['drop_media'][key]:>10}   {per['shrink'][key]:>6}   {per['error'][key]:>5}")
    return lines


def _length_lines(samples: list, cutoff_len: int) -> list:
    """Token lengths of the whole samples: percentiles, a histogram, the media items' token counts."""
    lengths = sorted(s["tokens"] for s in samples if s["tokens"] is not None)
    if not lengths:
        return []
    p = {q: _percentile(lengths, q) for q in (0.5, 0.9, 0.99)}
    lines = ["", f"tokens per sample (whole): p50 {p[0.5]}, p90 {p[0.9]}, p99 {p[0.99]}, max {lengths[-1]}"]
    lines += _histogram(lengths, cutoff_len)
    media = [n for s in samples for v in (s["media_tokens"] or {}).values() for n in v]
    if media:
        lines.append(f"media tokens per item: min {min(media)}, max {max(media)}, items {len(media)}")
    return lines


def _recommend_lines(rec: dict, cutoff_len: int) -> list:
    """The recommended cutoff_len per share kept whole, image_max_pixels, and what shrinks other media."""
    lines = [""]
    readable = "samples"
    if rec.get("left_out"):
        readable = "readable samples"
        lines.append(f"the figures below cover the {rec['covers']} of {rec['of']} samples that could be read; "
                     f"{len(rec['left_out'])} with bad input are left out (listed at the end)")
    for share, value in rec["cutoff_len_for_share"].items():
        lines.append(f"cutoff_len keeping {float(share):.0%} of {readable} whole: {value}")
    mp = rec["image_max_pixels_for_cutoff"]
    alone = len(mp.get("text_alone_too_long") or [])
    if mp.get("value"):  # what it covers: every sample that some image size can make fit
        but = f", except the {alone} over it without their images" if alone else ""
        lines.append(f"image_max_pixels at which every {readable[:-1]} fits cutoff_len {cutoff_len}{but}: "
                     f"{mp['value']} ({mp['side']}x{mp['side']})")
    elif mp.get("why") != "no images in these samples":
        lines.append(f"image_max_pixels for cutoff_len {cutoff_len}: none ({mp.get('why')})")
    for kind, info in (rec.get("media") or {}).items():
        levers = ", ".join(f"{k} (now {v})" for k, v in info["levers"].items())
        lines.append(f"{kind}s: {info['items']} items, up to {info['max_tokens']} tokens each, counted {info['counted']}; "
                     + (f"settings that shrink them: {levers}" if levers else
                        "no LLaMA-Factory setting shrinks them: shorter clips, or a larger cutoff_len"))
    if alone:
        lines.append(f"  ({alone} samples exceed cutoff_len with their text, videos and audio alone: "
                     "no image size helps them)")
    return lines


def _preview_lines(samples: list) -> list:
    """How the first row vlpatch cuts starts, and what comes before its answer, as training gets it."""
    cut = next((s for s in samples if s.get("preview")), None)
    if cut is None:
        return []
    lines = ["", f"a row vlpatch cuts, as training gets it (sample {_name(cut)}, {cut['vlpatch']}):",
             f"  starts:             {cut['preview']['row_start']!r}"]
    if "before_answer" in cut["preview"]:
        lines.append(f"  before its answer:  {cut['preview']['before_answer']!r}")
    return lines


def _bad_input_lines(samples: list, policy: str, info: dict) -> list:
    """The samples with bad input (the first ten), and whether training with vlpatch would stop on them."""
    lines = []
    bad = [s for s in samples if s["vanilla"].startswith("error")]
    if bad:
        lines.append(f"bad input (training without vlpatch dies on it; with vlpatch under policy {policy}: "
                     f"{', '.join(f'{n} {k}' for k, n in Counter(_bucket(s['vlpatch']) for s in bad).items())}):")
    for s in bad[:10]:
        lines.append(f"  sample {_name(s)}: {s['vanilla']} -> vlpatch: {_bucket(s['vlpatch'])}")
    if len(bad) > 10:
        lines.append(f"  ... {len(bad) - 10} more errors (see --json / --csv)")
    if info.get("training_stops"):
        lines.append(f"training with vlpatch stops before it starts: {info['samples']} of {info['of']} samples "
                     f"({info['samples'] / info['of']:.0%}) have bad input, more than VLPATCH_MAX_BAD ({info['max_bad']:.0%}); "
                     "fix the data (media_dir? dataset paths?) or raise VLPATCH_MAX_BAD")
    return lines


def _name(s: dict) -> str:
    """A sample as the user finds it: dataset[row] of their file, else the merged index."""
    if s.get("source_dataset") is not None and s.get("source_row") is not None:
        return f"{s['source_dataset']}[{s['source_row']}]"
    return str(s["index"])


def _bucket(outcome: str) -> str:
    return outcome.split(":")[0] if outcome.startswith("error") else outcome.split(" (")[0]


def _histogram(lengths, cutoff, bins: int = 10, width: int = 40) -> list:
    top = max(lengths[-1], cutoff)
    step = max(1, math.ceil((top + 1) / bins))
    counts = Counter(min(bins - 1, x // step) for x in lengths)
    peak = max(counts.values())
    out = []
    for b in range(bins):
        lo, hi = b * step, (b + 1) * step - 1
        mark = " <- cutoff_len" if lo <= cutoff <= hi else ""
        out.append(f"  {lo:>7}-{hi:<7} {'#' * round(width * counts.get(b, 0) / peak):<{width}} {counts.get(b, 0)}{mark}")
    return out


def plot(result: dict, path: str) -> None:
    """A PNG: the token histogram with the cutoff line, and the outcome counts without and with vlpatch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, cfg = result["samples"], result["config"]
    lengths = [s["tokens"] for s in samples if s["tokens"] is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.hist(lengths, bins=40, color="#4c72b0")
    left.axvline(cfg["cutoff_len"], color="#c44e52", linestyle="--", label=f"cutoff_len {cfg['cutoff_len']}")
    left.set_xlabel("tokens per sample (whole)")
    left.set_ylabel("samples")
    left.legend()
    van = Counter(_bucket(s["vanilla"]) for s in samples)
    pat = Counter(_bucket(s["vlpatch"]) for s in samples)
    keys = sorted(set(van) | set(pat), key=lambda k: -(van[k] + pat[k]))
    xs = range(len(keys))
    right.bar([x - 0.2 for x in xs], [van[k] for k in keys], width=0.4, label="without vlpatch", color="#8c8c8c")
    right.bar([x + 0.2 for x in xs], [pat[k] for k in keys], width=0.4, label=f"with vlpatch (policy {cfg['policy']})", color="#55a868")
    right.set_xticks(list(xs))
    right.set_xticklabels(keys, rotation=20, ha="right")
    right.set_ylabel("samples")
    right.legend()
    names = ",".join(cfg["dataset"]) if isinstance(cfg["dataset"], list) else cfg["dataset"]
    fig.suptitle(f"vlpatch scan: {len(samples)} samples of {names} (template {cfg['template']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_csv(result: dict, path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "source_dataset", "source_row", "tokens", "text_tokens", "media_tokens", "vanilla", "vlpatch", "detail",
                    *POLICIES])
        for s in result["samples"]:
            per = s.get("policies") or {}
            w.writerow([s["index"], s["source_dataset"], s["source_row"], s["tokens"], s["text_tokens"], json.dumps(s["media_tokens"]),
                        s["vanilla"], s["vlpatch"], s["detail"], *(per.get(p) for p in POLICIES)])


def dataset_from_file(path: str) -> tuple:
    """A dataset file without a dataset_info.json: register it in a temporary dataset_dir, the
    columns guessed from its first record (sharegpt `messages` with role/content, sharegpt
    `conversations` with from/value, or alpaca `instruction`/`output`); media paths stay relative to
    the file's own directory. Returns (dataset name, dataset_dir, media_dir)."""
    path = os.path.abspath(path)
    with open(path, encoding="utf-8") as fh:
        if path.endswith(".jsonl"):
            first = json.loads(fh.readline())
        else:
            data = json.load(fh)
            first = data[0] if isinstance(data, list) and data else {}
    media = {k: k for k in ("images", "videos", "audios") if k in first}
    if "messages" in first:
        info = {"formatting": "sharegpt", "columns": {"messages": "messages", **media},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"}}
    elif "conversations" in first:
        info = {"formatting": "sharegpt", "columns": {"messages": "conversations", **media}}
    else:
        info = {"formatting": "alpaca", "columns": {"prompt": "instruction", "query": "input", "response": "output", **media}}
    directory = _scratch_dir("vlpatch-scan-data-")
    with open(os.path.join(directory, "dataset_info.json"), "w", encoding="utf-8") as fh:
        json.dump({"scanned": {"file_name": path, **info}}, fh)
    return "scanned", directory, os.path.dirname(path)


def _fail(message: str) -> int:
    print(f"vlpatch scan: {message}", file=sys.stderr)
    return 2


def main(args) -> int:
    import yaml

    from ._console import upstream_output
    from .settings import SettingsError, check_policy

    config = {}
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as fh:
                config = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as exc:
            return _fail(f"cannot read the config {args.config}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        if not isinstance(config, dict):
            return _fail(f"the config {args.config} is not a mapping of LLaMA-Factory arguments")
    for key, value in (
        ("dataset", args.dataset),
        ("dataset_dir", args.dataset_dir),
        ("media_dir", args.media_dir),
        ("template", args.template),
        ("model_name_or_path", args.model),
        ("cutoff_len", args.cutoff_len),
        ("image_max_pixels", args.image_max_pixels),
        ("image_min_pixels", args.image_min_pixels),
    ):
        if value is not None:
            config[key] = value
    if args.dataset_file:
        if not os.path.isfile(args.dataset_file):
            return _fail(f"no such dataset file: {args.dataset_file}")
        try:
            config["dataset"], config["dataset_dir"], media_dir = dataset_from_file(args.dataset_file)
        except (OSError, ValueError) as exc:
            return _fail(f"cannot read the dataset file {args.dataset_file}: {type(exc).__name__}: {exc}")
        config.setdefault("media_dir", args.media_dir or media_dir)
    missing = [k for k in ("dataset", "template", "model_name_or_path") if not config.get(k)]
    if missing:
        return _fail(f"missing {', '.join(missing)} (a training YAML or the options)")
    # the policy training would use: the option, else VLPATCH_POLICY, else drop
    policy = args.policy or os.environ.get("VLPATCH_POLICY", "").strip() or "drop"
    problem = check_policy("--policy" if args.policy else "VLPATCH_POLICY", policy)
    if problem:
        return _fail(problem)
    if args.workers is not None and args.workers < 1:
        return _fail(f"--workers={args.workers} is not a number of processes (1 or more)")
    try:
        with upstream_output(verbose=args.verbose) as (console, log):
            result = scan(config, policy=policy, limit=args.limit, progress=False if args.no_progress else console,
                          workers=args.workers)
    except ScanSetupError as exc:
        return _fail(f"{exc}" + (f" (upstream's log: {log})" if log else ""))
    except SettingsError as exc:
        return _fail(str(exc))
    if args.csv:
        write_csv(result, args.csv)
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(summary(result))
    return 0
