"""Transcripts: the file round-trips bitwise, damage is reported at the right offset, and recording a
run neither changes it nor costs anything when off."""

import os

import jax
import numpy as np
import optax
import pytest

import sljax
from sljax import messages as msgs
from sljax.privacy import transcript as tr


def _write(path, items, meta=None):
  with tr.Recorder(path, meta=meta) as rec:
    for item in items:
      rec.record(*item)


def _items():
  up = msgs.SmashedData(np.arange(12, dtype=np.float32).reshape(3, 4), np.array([0, 1, 0], np.int32))
  down = msgs.CutGradient(np.full((3, 4), -0.5, np.float32))
  return [("up", 0, 0, 0, up), ("down", 0, 0, 0, down), ("up", 3, 7, 2**32 - 1, b"raw \x00 bytes"),
          ("down", 1, 2, 3, b"")]


def test_round_trip_is_bitwise(tmp_path):
  path = tmp_path / "run.sljt"
  _write(path, _items(), meta={"run": "unit"})
  loaded = tr.load(path)
  assert loaded.meta == {"run": "unit"}
  got = [(r.direction, r.round, r.step, r.client, r.payload) for r in loaded.records]
  want = [(d, r, s, c, p if isinstance(p, bytes) else msgs.to_bytes(p)) for d, r, s, c, p in _items()]
  assert got == want
  kind, body = tr.decode(loaded.records[0].payload)
  assert kind == "SmashedData" and np.array_equal(body["activations"], _items()[0][4].activations)


def _offsets(path):
  return [r.offset for r in tr.load(path).records]


def test_truncation_is_reported_at_the_offset_of_the_first_bad_record(tmp_path):
  path = tmp_path / "run.sljt"
  _write(path, _items())
  data = path.read_bytes()
  offsets = _offsets(path)
  cut = tmp_path / "cut.sljt"
  cut.write_bytes(data[: offsets[1] + 30])  # inside the second record's payload
  with pytest.raises(tr.TranscriptError, match=f"truncated record at byte offset {offsets[1]}: "):
    tr.load(cut)
  good = []
  with pytest.raises(tr.TranscriptError):
    for record in tr.read(cut):  # the records before it come out whole, then the error
      good.append(record.payload)
  assert good == [tr.load(path).records[0].payload]
  cut.write_bytes(data[: offsets[2] + 5])  # inside a record's header
  with pytest.raises(tr.TranscriptError, match=f"truncated record at byte offset {offsets[2]}: 5 of 21 header"):
    tr.load(cut)
  end = offsets[3] + 21  # the last record has an empty payload: the end record starts here
  cut.write_bytes(data[:end])  # cut at a record boundary: only the missing end record tells
  with pytest.raises(tr.TranscriptError, match=f"no end record at byte offset {end}"):
    tr.load(cut)
  cut.write_bytes(data[:10])
  with pytest.raises(tr.TranscriptError, match="truncated header at byte offset 0"):
    tr.load(cut)


def test_a_flipped_byte_is_reported_at_the_offset_of_its_record(tmp_path):
  path = tmp_path / "run.sljt"
  _write(path, _items(), meta={"run": "unit"})
  data = path.read_bytes()
  offsets = _offsets(path)
  for target, where in [(1, offsets[1] + 40), (2, offsets[2] + 10)]:  # a payload byte; the round field
    bad = bytearray(data)
    bad[where] ^= 0x01
    (tmp_path / "bad.sljt").write_bytes(bytes(bad))
    with pytest.raises(tr.TranscriptError, match=f"corrupted record at byte offset {offsets[target]}: CRC32"):
      tr.load(tmp_path / "bad.sljt")
  bad = bytearray(data)
  bad[22] ^= 0x01  # inside the meta
  (tmp_path / "bad.sljt").write_bytes(bytes(bad))
  with pytest.raises(tr.TranscriptError, match="corrupted header at byte offset 16: CRC32 mismatch"):
    tr.load(tmp_path / "bad.sljt")
  (tmp_path / "bad.sljt").write_bytes(b"PK\x03\x04" + data[4:])
  with pytest.raises(tr.TranscriptError, match="not an sljax transcript at byte offset 0"):
    tr.load(tmp_path / "bad.sljt")


def test_bad_records_get_errors_naming_the_argument(tmp_path):
  path = tmp_path / "run.sljt"
  with tr.Recorder(path) as rec:
    with pytest.raises(ValueError, match=r"direction: expected 'up' or 'down' \(notes: `note`, batches: "
                                         r"`record_truth`\), got 'note'"):
      rec.record("note", 0, 0, 0, b"")
    with pytest.raises(ValueError, match=r"round: expected an int in \[0, 2\*\*32 - 1\], got -1"):
      rec.record("up", -1, 0, 0, b"")
    with pytest.raises(TypeError, match="payload: expected bytes, a message of sljax.messages or a function returning "
                                        "one, got dict"):
      rec.record("up", 0, 0, 0, {"a": 1})
    with pytest.raises(TypeError, match="note: a value of type object is not JSON"):
      rec.note({"x": object()})
  with pytest.raises(ValueError, match="record after close"):
    rec.record("up", 0, 0, 0, b"")
  with pytest.raises(FileExistsError):
    tr.Recorder(path)
  with pytest.raises(ValueError, match="queue_size: expected a positive int, got 0"):
    tr.Recorder(tmp_path / "other.sljt", queue_size=0)
  assert tr.load(path).records == ()


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 6)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  model = sljax.cut(sljax.models.mlp(hidden=(8,), num_classes=2), 1)
  sl = sljax.vanilla(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
  return sl, sl.init(jax.random.key(0), x[:8]), x, y


def test_a_recorded_fit_equals_an_unrecorded_one_and_holds_every_message(setup, tmp_path):
  sl, state, x, y = setup
  plain, plain_history = sljax.fit(sl, state, x, y, key=jax.random.key(1), epochs=2, batch_size=8)
  path = tmp_path / "fit.sljt"
  with tr.Recorder(path, truth=True) as rec:
    recorded, history = sljax.fit(sl, state, x, y, key=jax.random.key(1), epochs=2, batch_size=8, transcript=rec)
  assert history == plain_history
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), recorded, plain)
  loaded = tr.load(path)
  assert loaded.notes["protocol"] == "vanilla" and loaded.notes["cut"] == {"shape": [8, 8], "dtype": "float32"}
  exchanges = loaded.exchanges()
  assert [(e.round, e.step) for e in exchanges] == [(r, s) for r in range(2) for s in range(5)]
  up_bytes = [r.payload for r in loaded.records if r.direction == "up"]
  assert all(len(b) == history[0]["bytes_up"] // 5 for b in up_bytes)  # exactly the bytes the step counts
  for e in exchanges:  # the truth is the batch: the smashed data is the client half of it
    np.testing.assert_array_equal(e.labels, e.true_labels)
    rows = [int(np.flatnonzero((x == row).all(axis=1))[0]) for row in e.inputs]
    np.testing.assert_array_equal(y[rows], e.labels)
  first = exchanges[0]
  smashed, _ = sl.model.client.apply(state.client.params, state.client.model_state, first.inputs, key=None, train=True)
  np.testing.assert_allclose(first.smashed, smashed, rtol=1e-6)


def test_recording_is_off_by_default_and_then_costs_nothing(setup, tmp_path, monkeypatch):
  sl, state, x, y = setup

  def refuse(*args, **kwargs):
    raise AssertionError("recording machinery used without a transcript")

  monkeypatch.setattr(tr, "FitRecording", refuse)
  monkeypatch.chdir(tmp_path)
  sljax.fit(sl, state, x, y, key=jax.random.key(1), epochs=1, batch_size=8)
  assert os.listdir(tmp_path) == []


def test_only_a_protocol_that_sends_messages_is_recorded(setup, tmp_path):
  sl, state, x, y = setup
  central = sljax.centralized(sl.model, optimizer=optax.sgd(0.1))
  with pytest.raises(TypeError, match="trainer: expected a vanilla or u_shaped protocol to record"):
    sljax.fit(central, None, x, y, key=jax.random.key(1), epochs=1, batch_size=8, transcript=tmp_path / "c.sljt")
  with pytest.raises(TypeError, match="transcript: expected a path, a Recorder or None, got int"):
    sljax.fit(sl, state, x, y, key=jax.random.key(1), epochs=1, batch_size=8, transcript=3)
  assert os.listdir(tmp_path) == []
