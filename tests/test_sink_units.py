"""The sink's pure parts, without a broker: columns from the event models, file names and
folders, rolling, formats, and the local store's atomic writes."""

from __future__ import annotations

import gzip
import io

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from captionflow.config import Settings, SinkSettings
from captionflow.errors import ConfigError, ObjectStoreUnavailableError
from captionflow.schemas.events import CaptionEvent
from captionflow.sink.buffer import PartitionBuffer
from captionflow.sink.formats import Row, file_format
from captionflow.sink.layout import NULL_FOLDER_VALUE, FileName, Layout
from captionflow.sink.local_store import LocalStore
from captionflow.sink.read import open_dataset
from captionflow.sink.schema import EventSchema
from captionflow.sink.stores import open_store
from tests.support.sink_helpers import caption_event

KNOWN = set(CaptionEvent.model_fields) | {"from"}


def rows(*indexes: int, **extra) -> list[Row]:
    out = []
    for i in indexes:
        raw = caption_event(i, **extra)
        out.append(Row(i, raw, orjson.loads(raw)))
    return out


def test_a_caption_event_round_trips_through_parquet_with_typed_nested_parts():
    fmt = file_format("parquet")
    encoded = fmt.encode(rows(0, 1, 2), EventSchema(CaptionEvent))
    table = pq.read_table(io.BytesIO(encoded.body))
    assert table.num_rows == 3 and not encoded.rejected
    got, want = table.to_pylist()[1], orjson.loads(caption_event(1))
    for plain in ("id", "caption", "status", "model", "created_at", "video", "conversation"):
        assert got[plain] == want[plain], plain
    assert got["video_info"] == {**{k: None for k in ("bytes_read", "decode_device")},
                                 **want["video_info"]}
    assert got["usage"] == want["usage"] and got["source"] == want["source"]
    assert dict(got["captions"]) == want["captions"]
    assert orjson.loads(got["caption_json"]) == want["caption_json"]
    assert orjson.loads(got["metadata"]) == want["metadata"]
    assert orjson.loads(got["windows"][0]["caption_json"]) == {"objects": ["ball", 1]}
    assert table.schema.field("video_info").type.field("duration_s").type == pa.float64()
    assert table.schema.field("schema_version").type == pa.int64()


def test_unknown_fields_become_columns_typed_by_their_values():
    schema = EventSchema(CaptionEvent)
    table = schema.table([r.data for r in rows(0, 1, score=1, tag="x", deep={"a": [1]})])
    assert table.schema.field("score").type == pa.int64()
    assert table.schema.field("tag").type == pa.string()
    assert table.schema.field("deep").type == pa.string()  # JSON text
    mixed = schema.table([orjson.loads(caption_event(0, score=1)),
                          orjson.loads(caption_event(1, score=0.5))])
    assert mixed.schema.field("score").type == pa.float64()


def test_a_value_that_does_not_fit_its_column_leaves_only_that_row_out():
    good = rows(0, 1)
    bad = orjson.loads(caption_event(2))
    bad["video_info"] = "not an object"
    encoded = file_format("parquet").encode([good[0], Row(2, b"{}", bad), good[1]],
                                            EventSchema(CaptionEvent))
    assert encoded.rows == 2 and [r.offset for r, _ in encoded.rejected] == [2]


def test_file_names_are_fixed_by_topic_partition_and_first_offset():
    name = FileName("captionflow.captions", 3, 12345, "parquet")
    assert str(name) == "captionflow.captions+3+000000012345.parquet"
    assert FileName.parse(f"captions/partition=3/{name}") == name
    assert FileName.parse("captions/_tmp/x.tmp") is None
    layout = Layout("captions", ("partition",), known_fields=KNOWN)
    assert layout.key(layout.folder(3, {}), name) == f"captions/partition=3/{name}"


def test_hive_folders_by_date_and_field_values_are_escaped():
    layout = Layout("captions", ("date", "model", "partition"), known_fields=KNOWN)
    folder = layout.folder(1, {"created_at": "2026-12-03T10:00:00Z", "model": "Qwen/Qwen2.5"})
    assert folder == "date=2026-12-03/model=Qwen%2FQwen2.5/partition=1"
    assert layout.folder(0, {}) == f"date={NULL_FOLDER_VALUE}/model={NULL_FOLDER_VALUE}/" \
                                   "partition=0"
    assert layout.fields == ("model",)
    with pytest.raises(ConfigError, match="no top-level field 'modle'"):
        Layout("captions", ("modle",), known_fields=KNOWN)


def test_a_buffer_rolls_at_records_bytes_or_interval():
    buffer = PartitionBuffer()
    assert buffer.due(flush_records=2, flush_bytes=100, flush_interval_s=5) is None
    buffer.add("f", rows(0)[0], 10, 40)
    assert buffer.next_offset == 11
    now = buffer.first_at
    assert buffer.due(flush_records=2, flush_bytes=100, flush_interval_s=5, now=now) is None
    assert buffer.due(flush_records=2, flush_bytes=100, flush_interval_s=5,
                      now=now + 5) == "interval"
    assert buffer.due(flush_records=2, flush_bytes=40, flush_interval_s=5, now=now) == "bytes"
    buffer.add("f", None, 11, 1)  # a record left out still moves the commit point
    assert buffer.due(flush_records=2, flush_bytes=100, flush_interval_s=5, now=now) == \
        "records"
    assert buffer.next_offset == 12 and len(buffer.folders["f"]) == 1


def test_jsonl_keeps_each_record_as_it_was_and_gzip_is_reproducible():
    r = rows(0, 1)
    plain = file_format("jsonl").encode(r, EventSchema(CaptionEvent)).body
    assert plain.splitlines() == [x.raw for x in r]
    gz = file_format("jsonl.gz")
    first = gz.encode(r, EventSchema(CaptionEvent)).body
    assert gzip.decompress(first) == plain
    assert gz.encode(r, EventSchema(CaptionEvent)).body == first  # a rewrite is identical


def test_local_store_renames_whole_files_and_readers_skip_tmp(tmp_path):
    store = LocalStore.from_url(str(tmp_path), Settings())
    body = file_format("parquet").encode(rows(0, 1), EventSchema(CaptionEvent)).body
    store.put("captions/partition=0/t+0+000000000000.parquet", body)
    # What a write cut short leaves: a temporary name under _tmp/, never the final name.
    (tmp_path / "captions" / "_tmp" / "t+0+000000000002.parquet.dead.tmp").write_bytes(b"PAR1")
    visible = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.parquet")
               if "_tmp" not in p.parts]
    assert visible == ["captions/partition=0/t+0+000000000000.parquet"]
    assert open_dataset(str(tmp_path / "captions")).to_table().num_rows == 2
    assert store.clean_temporary("captions", "t+0+") == 1
    assert not list((tmp_path / "captions" / "_tmp").iterdir())


def test_local_store_failure_is_a_dependency_error(tmp_path):
    store = LocalStore.from_url(str(tmp_path), Settings())
    (tmp_path / "captions").write_text("a file where a folder must be")
    with pytest.raises(ObjectStoreUnavailableError):
        store.put("captions/partition=0/x+0+000000000000.parquet", b"x")


def test_destinations_are_resolved_by_scheme(tmp_path):
    settings = Settings(sink=SinkSettings(to="s3://bucket/some/prefix"))
    store = open_store("s3://bucket/some/prefix", settings)
    assert (store.bucket, store.prefix) == ("bucket", "some/prefix/")
    assert open_store(f"file://{tmp_path}", settings).root == tmp_path
    with pytest.raises(ConfigError, match="unknown scheme 'gs'"):
        open_store("gs://bucket/x", settings)


def test_sink_settings_are_checked():
    with pytest.raises(ValueError, match="heartbeat_interval_ms"):
        SinkSettings(session_timeout_ms=1000, heartbeat_interval_ms=1000)
    with pytest.raises(ValueError, match="twice"):
        SinkSettings(partition_by=("date", "date"))
