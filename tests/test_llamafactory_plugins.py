"""Every LLaMA-Factory mm_plugin, with a tiny processor of its family (the real transformers class, or
a stand-in where the processor is remote code on the hub: `tests/fixtures/tiny_processors.py` says
which): for each media kind the plugin handles, vanilla cuts into that kind's tokens, the patch keeps
every item's span whole, and the spans are exactly those of the uncut sample. The media tokens are
named here by family, independently of how vlpatch learns them."""

import copy

import pytest

from tests.conftest import require
from tests.fixtures.tiny_models import long_text
from tests.fixtures.lf_families import Unbuildable, lf_family
from tests.fixtures.tiny_processors import FAMILIES, PREFIX_FAMILIES, _as_family, make_media

pytestmark = pytest.mark.llamafactory

GAP = 12  # media tokens closer than this belong to one item's span (Qwen3-VL frame timestamps)


def build(family, tmp_path) -> tuple:
    require("llamafactory")
    try:
        return lf_family(family, str(tmp_path / "tok"))
    except Unbuildable as exc:
        pytest.skip(str(exc))


def encode(fam, template, rows, cutoff):
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from llamafactory.hparams import DataArguments

    data_args = DataArguments(cutoff_len=cutoff)
    p = SupervisedDatasetProcessor(template=template, tokenizer=fam.tok, processor=fam.proc, data_args=data_args)
    cols = {"image": "_images", "video": "_videos", "audio": "_audios"}
    return p.preprocess_dataset(
        {
            "_prompt": [r[0] for r in rows],
            "_response": [r[1] for r in rows],
            "_system": ["" for _ in rows],
            "_tools": ["" for _ in rows],
            **{col: [r[2].get(kind) for r in rows] for kind, col in cols.items()},
        }
    )


def spans(ids, media) -> list:
    """The media spans of a sequence, as the test sees them: media tokens less than GAP apart, and
    everything between them."""
    at = [i for i, t in enumerate(ids) if t in media]
    out, start = [], None
    for k, i in enumerate(at):
        if start is None:
            start = i
        if k + 1 == len(at) or at[k + 1] - i > GAP:
            out.append(tuple(ids[start : i + 1]))
            start = None
    return out


def holds(ids, wanted) -> bool:
    """Whether `ids` holds every span of `wanted` contiguously, in order (text between them may be cut,
    so kept items can end up next to each other)."""
    pos = 0
    for span in wanted:
        n = len(span)
        while pos + n <= len(ids) and tuple(ids[pos : pos + n]) != span:
            pos += 1
        if pos + n > len(ids):
            return False
        pos += n
    return True


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_keeps_every_item_whole(family, tmp_path, patched):
    fam, template, media = build(family, tmp_path)
    for kind in fam.kinds:
        _check_kind(fam, template, media, kind, tmp_path / kind, patched)


def _check_kind(fam, template, media, kind, where, patched):
    where.mkdir()
    items = make_media(fam, kind, 2, str(where))
    ph = {"image": "<image>", "video": "<video>", "audio": "<audio>"}[kind]
    if kind == "video" and fam.model_args.get("use_audio_in_video"):
        ph = "<video><audio>"
    # text enough before the media that a row cut in the middle of the second item still holds both items
    # beside the chat frame a cut keeps (the template's system block and user header: Gemma 4's video items
    # are 291 tokens each)
    prompt = [{"role": "user", "content": long_text(200, 1) + f" {ph} middle words " + long_text(8, 2) + f" {ph} end"}]
    rows = [(prompt, [{"role": "assistant", "content": "fine answer"}], items)]

    full = encode(fam, template, rows, 10**6)
    ids, labels = full["input_ids"][0], full["labels"][0]
    full_spans = spans(ids, media)
    assert len(full_spans) == 2, f"{fam.template} {kind}: expected two media spans, found {len(full_spans)}"
    target = len(ids) - next(i for i, lab in enumerate(labels) if lab != -100)
    at = [i for i, t in enumerate(ids) if t in media]
    second = [i for i in at if i >= at[-1] - len(full_spans[1]) + 1]
    # upstream's source slice stops just before the last media token, then in the middle of the second item
    for stop in (at[-1], second[len(second) // 2]):
        cutoff = stop + target
        vanilla = encode(fam, template, rows, cutoff)["input_ids"][0]
        assert spans(vanilla, media) != full_spans, f"{fam.template} {kind}: vanilla cuts into the media tokens"

        patched()
        out = encode(fam, template, rows, cutoff)
        assert len(out["input_ids"]) == 1, f"{fam.template} {kind}: the sample was dropped"
        got = out["input_ids"][0]
        assert len(got) <= cutoff and len(out["labels"][0]) == len(got)
        assert holds(got, full_spans), f"{fam.template} {kind}: every item's span kept, whole and in order"
        assert [t for t in got if t in media] == [t for t in ids if t in media], f"{fam.template} {kind}: no other media token"
        import vlpatch

        vlpatch.revert()


@pytest.mark.parametrize("family", sorted(PREFIX_FAMILIES))
def test_prefix_family_is_left_as_upstream_has_it(family, tmp_path, patched):
    fam, template, media = build(family, tmp_path)
    items = make_media(fam, "image", 1, str(tmp_path))
    rows = [([{"role": "user", "content": "<image>" + long_text(80, 3)}], [{"role": "assistant", "content": "ok"}], items)]
    n_media = len([t for t in encode(fam, template, rows, 10**6)["input_ids"][0] if t in media])
    vanilla = encode(fam, template, rows, n_media + 20)
    patched()
    out = encode(fam, template, rows, n_media + 20)
    assert out["input_ids"] == vanilla["input_ids"] and out["labels"] == vanilla["labels"]
    assert len([t for t in out["input_ids"][0] if t in media]) == n_media


def test_coverage_table_names_every_plugin_of_this_release(tmp_path):
    """The matrix's coverage table (the README's table) against the installed LLaMA-Factory: every plugin
    of this release is in it and every plugin it says this release has is here; every media kind it
    claims has a test family that exercises it."""
    require("llamafactory")
    import importlib.metadata

    from packaging.version import Version

    from llamafactory.data.mm_plugin import PLUGINS

    import vlpatch.matrix as vmatrix

    table = vmatrix.load().by_id("llamafactory.truncation").options["coverage"]
    installed = Version(importlib.metadata.version("llamafactory"))
    assert set(PLUGINS) == {name for name, row in table.items() if Version(row["since"]) <= installed}
    builders = {**FAMILIES, **PREFIX_FAMILIES}
    for name, row in table.items():
        families = row.get("families", [name])
        assert all(f in builders for f in families), f"{name}: no test family {families}"
        if not families:
            continue
        kinds = set()
        for f in families:
            try:
                kinds |= set(_as_family(builders[f](str(tmp_path / f))).kinds)
            except (ImportError, AttributeError, TypeError):
                continue  # this transformers cannot build it; the newest session does
        if kinds:
            assert kinds == set(row["kinds"]), f"{name}: table says {row['kinds']}, tests cover {sorted(kinds)}"


def test_a_plugin_whose_layout_cannot_be_learned_is_refused(tmp_path, patched):
    """A plugin that writes its tokens away from the placeholder (here: at the start of the message)
    cannot be read: the sample is dropped and reported, never cut blindly; under `error` it raises."""
    fam, template, media = build("qwen2_vl", tmp_path)
    from llamafactory.data import mm_plugin

    import vlpatch

    base = type(template.mm_plugin)

    class Elsewhere(base):
        def process_messages(self, messages, images, videos, audios, processor):
            out = super().process_messages(messages, images, videos, audios, processor)
            for m in out:
                head, sep, rest = m["content"].partition("<|vision_start|>")
                if sep:
                    body, sep2, tail = rest.partition("<|vision_end|>")
                    m["content"] = sep + body + sep2 + head + tail
            return out

    plugin = template.mm_plugin
    template = copy.copy(template)  # LLaMA-Factory's templates are module globals: leave theirs alone
    template.mm_plugin = Elsewhere(**{f: getattr(plugin, f) for f in plugin.__dataclass_fields__})
    items = make_media(fam, "image", 1, str(tmp_path))
    rows = [([{"role": "user", "content": long_text(60, 1) + " <image> end"}], [{"role": "assistant", "content": "ok"}], items)]
    full = encode(fam, template, rows, 10**6)["input_ids"][0]
    patched()
    out = encode(fam, template, rows, len(full) - 10)
    assert out["input_ids"] == [], "not understood: dropped, not cut"
    (row,) = vlpatch.report.read_report(str(tmp_path / "vlpatch_report.jsonl"))
    assert row["action"] == "dropped" and row["reason"].startswith("uncovered_media: Elsewhere")
    patched(policy="error")
    with pytest.raises(vlpatch.SampleError, match="uncovered_media"):
        encode(fam, template, rows, len(full) - 10)
    assert mm_plugin  # the module stays as upstream has it


def test_drop_media_takes_a_video_out_with_its_own_audio(tmp_path, patched):
    """Qwen2.5-Omni with use_audio_in_video writes one span per video holding its audio: under
    drop_media the video that does not fit leaves with its audio, and the kept pair stays whole."""
    fam, template, media = build("qwen2_omni_av", tmp_path)
    items = make_media(fam, "video", 2, str(tmp_path))
    prompt = [{"role": "user", "content": "<video><audio> " + long_text(10, 1) + " <video><audio> end"}]
    rows = [(prompt, [{"role": "assistant", "content": "fine answer"}], items)]
    ids = encode(fam, template, rows, 10**6)["input_ids"][0]
    first, second = spans(ids, media)
    patched(policy="drop_media")
    out = encode(fam, template, rows, len(first) + len(second) // 2 + 10)  # room for one video, not two
    got = out["input_ids"][0]
    assert holds(got, [first]) and [t for t in got if t in media] == list(t for t in first if t in media)
    assert len(out["videos"][0]) == 1 and len(out["audios"][0]) == 1, "the second video left with its audio"
    import vlpatch

    (row,) = vlpatch.report.read_report(str(tmp_path / "vlpatch_report.jsonl"))
    assert row["action"] == "media_dropped" and row["media_removed"] == {"video": [1], "audio": [1]}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_spans_read_without_a_marked_run_equal_the_marked_runs(family, tmp_path):
    """Once a plugin's marked run showed the shape of a kind's expansion, vlpatch reads the next samples'
    spans off the plugin's own output (`_predicted`: Qwen-VL's pads between their markers, Gemma 3's and
    LLaVA's fixed runs). On samples made to confuse that reading (items side by side, at the start and
    the end of a message, in several turns, of several sizes) it equals what a marked run says, item by
    item; for the families where the shape is known it does read them without a marked run. A sample
    after one whose items were all one text is first assumed alike (`_assumed`): the runs it gives are
    the ones read (items of several sizes fall back to reading)."""
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from llamafactory.hparams import DataArguments

    from vlpatch.integrations import llamafactory as lf_integration

    fam, template, _ = build(family, tmp_path)
    processor = SupervisedDatasetProcessor(template=template, tokenizer=fam.tok, processor=fam.proc,
                                           data_args=DataArguments(cutoff_len=10**6))
    marked_runs = []
    real_mark = lf_integration._mark

    def counting_mark(*args, **kwargs):
        marked_runs.append(1)
        return real_mark(*args, **kwargs)

    def learned(row):
        with lf_integration.tracing(processor) as (recording, trace):
            out = recording.preprocess_dataset({
                "_prompt": [row[0]], "_response": [row[1]], "_system": [""], "_tools": [""],
                **{f"_{kind}s": [row[2].get(kind)] for kind in ("image", "video", "audio")},
            })
        got = lf_integration.learn(processor, trace)
        runs = got[0].runs(out["input_ids"][0])  # where assumed: borne out by the ids, else read
        return [(tuple((e.keys, e.tokens) for e in g.expansions), g.prefix, g.prefix_keys, g.marks) for g in got], runs

    answer = [{"role": "assistant", "content": "fine answer"}]
    for kind in fam.kinds:
        (tmp_path / kind).mkdir()
        items = make_media(fam, kind, 3, str(tmp_path / kind))
        ph = {"image": "<image>", "video": "<video>", "audio": "<audio>"}[kind]
        if kind == "video" and fam.model_args.get("use_audio_in_video"):
            ph = "<video><audio>"
        rows = [
            ([{"role": "user", "content": f"{ph}{ph} two side by side, then {ph}"}], answer, items),
            ([{"role": "user", "content": f"at the end {ph}"}, {"role": "assistant", "content": "seen"},
              {"role": "user", "content": f"{ph}{ph}"}], answer, {k: v[::-1] for k, v in items.items()}),
            ([{"role": "user", "content": f"{ph} first {ph} middle words {ph}"}], answer,
             {k: [v[1], v[0], v[2]] for k, v in items.items()}),
        ]
        for row in rows:
            lf_integration._known.clear()
            by_markers = learned(row)  # a marked run, which the plugin's shape is remembered from
            lf_integration._mark, marked_runs[:] = counting_mark, []
            try:
                read = learned(row)
            finally:
                lf_integration._mark = real_mark
            assert read == by_markers, f"{fam.template} {kind}: the spans read off the output differ from the marked run's"
            assert learned(row) == by_markers, f"{fam.template} {kind}: the spans assumed alike differ from the marked run's"
            if family in ("qwen2_vl", "gemma3", "llava") and kind == "image":
                assert not marked_runs, f"{fam.template}: the spans were not read off the plugin's output"


def test_a_sample_assumed_alike_that_is_not_is_read(tmp_path, patched):
    """Gemma 3 writes every image as one run: after a sample read so, the next is assumed alike (its spans
    found in the ids, no text read). When the plugin writes another run (here: a processor with a shorter
    image sequence), the ids do not bear the assumption out: the sample is read, and every item of the
    new run is kept whole."""
    from vlpatch.integrations import llamafactory as lf_integration

    fam, template, media = build("gemma3", tmp_path)
    items = make_media(fam, "image", 2, str(tmp_path))
    prompt = [{"role": "user", "content": long_text(200, 1) + " <image> middle words " + long_text(8, 2) + " <image> end"}]
    rows = [(prompt, [{"role": "assistant", "content": "fine answer"}], items)]
    reads = []
    real_read = lf_integration._read

    def counting_read(*args, **kwargs):
        reads.append(1)
        return real_read(*args, **kwargs)

    def check():
        full = encode(fam, template, rows, 10**6)["input_ids"][0]
        wanted = spans(full, media)
        assert len(wanted) == 2
        patched()
        lf_integration._read, reads[:] = counting_read, []
        try:
            out = encode(fam, template, rows, len(full) - 20)["input_ids"]
        finally:
            lf_integration._read = real_read
        import vlpatch

        vlpatch.revert()
        assert len(out) == 1 and holds(out[0], wanted) and len(out[0]) <= len(full) - 20
        return len(reads)

    check()  # the plugin's kinds learned (a marked run)
    check()  # read off the output: every image one text
    assert check() == 0, "assumed alike, borne out by the ids"
    sequence = fam.proc.full_image_sequence
    boi, image_token = fam.proc.boi_token, fam.proc.image_token
    fam.proc.full_image_sequence = sequence.replace(boi + image_token * 4, boi, 1)  # four tokens fewer an image
    assert fam.proc.full_image_sequence.count(image_token) == sequence.count(image_token) - 4
    try:
        assert check() == 1, "the ids did not bear it out: read"
    finally:
        fam.proc.full_image_sequence = sequence
