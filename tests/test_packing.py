import pytest
import torch

from hypercompress.formats.packing import pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 64, 1001])
def test_round_trip_is_exact_and_dense(bits, count):
    generator = torch.Generator().manual_seed(bits * 1000 + count)
    codes = torch.randint(0, 1 << bits, (count,), generator=generator)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(count, bits) == (count * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, count).long(), codes)


def test_bit_order_is_msb_first():
    assert pack_codes(torch.tensor([1, 2]), 4).tolist() == [0x12]
    assert pack_codes(torch.tensor([0b101, 0b011]), 3).tolist() == [0b10101100]


def test_out_of_range_codes_are_refused():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([16]), 4)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 4)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_equals_the_bit_matrix_reference(bits):
    from hypercompress.formats.packing import pack_codes_reference

    generator = torch.Generator().manual_seed(bits)
    for count in (0, 1, 7, 8, 9, 1000, 4097):
        codes = torch.randint(0, 1 << bits, (count,), generator=generator)
        assert torch.equal(pack_codes(codes, bits), pack_codes_reference(codes, bits)), (bits, count)
