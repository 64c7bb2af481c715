"""crc32.combine against zlib.crc32 of concatenations; Pieces in any order."""
import random
import zlib

from hypothesis import given, settings, strategies as st
import pytest

from t2t_avg.files import crc32

_LENGTHS = st.one_of(st.integers(0, 16), st.integers(0, 70_000),
                     st.sampled_from([1 << 20, (8 << 20) + 3]))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), length_a=_LENGTHS, length_b=_LENGTHS)
def test_combine_is_the_crc32_of_the_concatenation(seed, length_a, length_b):
  rng = random.Random(seed)
  a, b = rng.randbytes(length_a), rng.randbytes(length_b)
  assert crc32.combine(zlib.crc32(a), zlib.crc32(b), len(b)) == (
      zlib.crc32(a + b))


@settings(max_examples=200, deadline=None)
@given(crc_a=st.integers(0, 2**32 - 1),
       length_b=st.integers(0, 2**45))
def test_combine_with_nothing_after_keeps_the_crc_and_large_lengths_agree(
    crc_a, length_b):
  """Lengths too large to build: shifting by m then n bytes is shifting by
  m + n (x^(8 (m + n)) = x^(8 m) x^(8 n)), and appending 1000 zero bytes
  is what zlib.crc32 finds for them."""
  assert crc32.combine(crc_a, 0, 0) == crc_a
  zeros = zlib.crc32(bytes(1000))
  half = length_b // 2
  in_two = crc32.combine(crc32.combine(crc_a, 0, half), 0, length_b - half)
  assert crc32.combine(crc_a, 0, length_b) == in_two
  assert crc32.combine(crc_a, zeros, 1000) == zlib.crc32(bytes(1000), crc_a)


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=5000), start=st.integers(0, 2**32 - 1))
def test_checksum_is_zlibs_crc32_whichever_library_computes_it(data, start):
  assert crc32.checksum(data, start) == zlib.crc32(data, start)
  assert crc32.checksum(memoryview(data)) == zlib.crc32(data)


def test_combine_refuses_a_negative_length():
  with pytest.raises(ValueError, match="-1"):
    crc32.combine(0, 0, -1)


def _read_from(data, reads):
  def read(offset, length):
    reads.append((offset, length))
    return data[offset:offset + length]
  return read


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(0, 400_000),
       count=st.integers(0, 12))
def test_pieces_in_any_order_give_the_crc32_of_the_whole(seed, size, count):
  """Pieces recorded out of order, twice, overlapping or not at all: the
  total is zlib's CRC-32 of the bytes, and the sweep reads only what no
  kept piece covers."""
  rng = random.Random(seed)
  data = rng.randbytes(size)
  pieces = crc32.Pieces(size)
  recorded = []
  for _ in range(count):
    start = rng.randrange(size + 1)
    stop = rng.randrange(start, size + 1)
    recorded.append((start, stop))
  recorded += recorded[:2]  # read twice
  rng.shuffle(recorded)
  for start, stop in recorded:
    pieces.add_crc(start, stop - start, zlib.crc32(data[start:stop]))
  reads = []
  assert pieces.total(_read_from(data, reads)) == zlib.crc32(data)
  assert sum(length for _, length in reads) + pieces.covered() == size


def test_small_pieces_are_left_to_the_sweep_and_large_ones_are_not_read():
  rng = random.Random(0)
  data = rng.randbytes(3 * crc32.SMALL_PIECE)
  pieces = crc32.Pieces(len(data))
  small = memoryview(data)[:crc32.SMALL_PIECE - 1]
  large = memoryview(data)[crc32.SMALL_PIECE:]
  pieces.add(0, small)
  pieces.add(crc32.SMALL_PIECE, large)
  reads = []
  assert pieces.total(_read_from(data, reads)) == zlib.crc32(data)
  assert reads == [(0, crc32.SMALL_PIECE)]


def test_a_changed_byte_changes_the_total():
  data = bytearray(random.Random(1).randbytes(200_000))
  pieces = crc32.Pieces(len(data))
  pieces.add(100_000, memoryview(data)[100_000:])
  expected = zlib.crc32(data)
  data[5] ^= 1  # in the part the sweep reads
  assert pieces.total(_read_from(bytes(data), [])) != expected


def test_pieces_refuse_bytes_outside_the_range_and_a_short_read():
  pieces = crc32.Pieces(10)
  with pytest.raises(ValueError, match=r"\[8, 12\)"):
    pieces.add_crc(8, 4, 0)
  with pytest.raises(EOFError):
    pieces.total(lambda offset, length: b"x" * (length - 1))
