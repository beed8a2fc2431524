"""decode on JPEG, PNG, TIFF and BMP: every colour mode and bit depth gives the same [0, 1] gray array, and every bad
input gives one exact, one-line message naming the file."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import save_gray, synthetic_xray
from PIL import Image

from pneumoscan.data.images import MAX_PIXELS, ImageReadError, _pil_to_gray, decode
from pneumoscan.preprocess import Preprocessing


def _u8(image: np.ndarray) -> np.ndarray:
    return np.round(image * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    """An 8-bit-exact synthetic radiograph using the full 0..255 range, 48 x 64."""
    image = synthetic_xray(64)[8:56, :]
    image = (image - image.min()) / (image.max() - image.min())
    return _u8(image).astype(np.float32) / 255.0


def _error(source, **kwargs) -> str:
    with pytest.raises(ImageReadError) as info:
        decode(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- formats and colour modes -------------------------------------------------------------------------------

def test_jpeg_decodes_to_float_gray_close_to_the_original(tmp_path, picture):
    path = tmp_path / "x.jpeg"
    Image.fromarray(_u8(picture), "L").save(path, quality=95)
    image = decode(path).pixels
    assert image.dtype == np.float32 and image.shape == (48, 64)
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert np.abs(image - picture).mean() < 2 / 255


def test_gray_png_is_exact(tmp_path, picture):
    image = decode(save_gray(tmp_path / "x.png", picture)).pixels
    assert image.dtype == np.float32
    assert np.array_equal(image, picture)


def test_rgb_png_of_a_gray_picture_equals_the_gray_png(tmp_path, picture):
    gray = decode(save_gray(tmp_path / "gray.png", picture, "L")).pixels
    rgb = decode(save_gray(tmp_path / "rgb.png", picture, "RGB")).pixels
    assert np.array_equal(gray, rgb)


def test_gray_and_rgb_copies_give_the_training_preprocessing_input(tmp_path, picture):
    prep = Preprocessing(size=32)
    expected = prep.to_uint8(picture)
    for mode in ("L", "RGB", "RGBA", "P"):
        path = save_gray(tmp_path / f"{mode}.png", picture, mode)
        assert np.array_equal(prep.to_uint8(decode(path).pixels), expected), mode


def test_rgb_and_gray_jpeg_copies_are_nearly_identical(tmp_path, picture):
    # The Kermany train copies are RGB JPEGs, the test originals gray JPEGs: both must look the same.
    gray = decode(save_gray(tmp_path / "gray.jpeg", picture, "L")).pixels
    rgb = decode(save_gray(tmp_path / "rgb.jpeg", picture, "RGB")).pixels
    assert np.abs(gray - rgb).max() <= 3 / 255


def test_colour_rgb_is_converted_with_itu_601_luma(tmp_path):
    data = np.zeros((2, 2, 3), np.uint8)
    data[0, 0] = (255, 0, 0)
    data[0, 1] = (0, 255, 0)
    data[1, 0] = (0, 0, 255)
    data[1, 1] = (255, 255, 255)
    path = tmp_path / "colour.png"
    Image.fromarray(data, "RGB").save(path)
    assert np.array_equal(decode(path).pixels, np.array([[76, 150], [29, 255]], np.float32) / 255)


def test_transparent_rgba_pixels_become_black(tmp_path):
    data = np.zeros((1, 3, 4), np.uint8)
    data[0, 0] = (200, 200, 200, 255)  # opaque
    data[0, 1] = (200, 200, 200, 0)  # fully transparent: air
    data[0, 2] = (200, 200, 200, 128)  # half transparent: blended with black
    path = tmp_path / "rgba.png"
    Image.fromarray(data, "RGBA").save(path)
    image = decode(path).pixels
    assert image[0, 0] == pytest.approx(200 / 255)
    assert image[0, 1] == 0.0
    assert image[0, 2] == pytest.approx(100 / 255, abs=1 / 255)


def test_gray_with_alpha_treats_transparent_as_black(tmp_path):
    path = tmp_path / "la.png"
    Image.fromarray(np.array([[[90, 255], [90, 0]]], np.uint8), "LA").save(path)
    assert np.array_equal(decode(path).pixels, np.array([[90 / 255, 0.0]], np.float32))


def test_palette_png_uses_the_palette_colours(tmp_path):
    image = Image.new("P", (3, 1))
    image.putpalette([0, 0, 0, 255, 255, 255, 10, 20, 30] + [0] * (256 * 3 - 9))
    image.putdata([2, 1, 0])
    path = tmp_path / "palette.png"
    image.save(path)
    luma = round(10 * 0.299 + 20 * 0.587 + 30 * 0.114)
    assert np.array_equal(decode(path).pixels, np.array([[luma, 255, 0]], np.float32) / 255)


def test_palette_png_with_a_transparent_entry_makes_it_black(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([200, 200, 200, 120, 120, 120] + [0] * (256 * 3 - 6))
    image.putdata([0, 1])
    path = tmp_path / "palette_t.png"
    image.save(path, transparency=0)
    assert np.array_equal(decode(path).pixels, np.array([[0, 120]], np.float32) / 255)


def test_16bit_png_keeps_the_intensity_scale_of_the_8bit_copy(tmp_path, picture):
    eight = decode(save_gray(tmp_path / "8.png", picture)).pixels
    path16 = tmp_path / "16.png"
    Image.fromarray(np.round(picture * 65535).astype(np.uint16)).save(path16)
    with Image.open(path16) as check:
        assert check.mode.startswith("I")
    sixteen = decode(path16).pixels
    assert sixteen.dtype == np.float32 and sixteen.shape == eight.shape
    assert np.abs(sixteen - eight).max() <= 1 / 255
    # the exact 16-bit image of 8-bit data (x * 257) decodes to exactly the same numbers
    exact = tmp_path / "16x257.png"
    Image.fromarray(_u8(picture).astype(np.uint16) * 257).save(exact)
    assert np.allclose(decode(exact).pixels, eight, atol=1e-6)


def test_dark_16bit_png_stays_dark(tmp_path):
    path = tmp_path / "dark16.png"
    Image.fromarray(np.array([[0, 100, 200]], np.uint16)).save(path)
    assert np.allclose(decode(path).pixels, np.array([[0, 100, 200]]) / 65535, atol=1e-7)


def test_32bit_integer_png_image_is_scaled_as_16bit_not_by_its_content():
    image = Image.fromarray(np.array([[0, 100, 200]], np.int32), "I")  # how older Pillows open 16-bit PNGs
    assert np.allclose(_pil_to_gray(image, "x.png", "PNG"), np.array([[0, 100, 200]]) / 65535, atol=1e-7)


def test_bilevel_png_maps_to_zero_and_one(tmp_path):
    path = tmp_path / "bw.png"
    Image.fromarray(np.array([[0, 255]], np.uint8), "L").convert("1").save(path)
    assert np.array_equal(decode(path).pixels, np.array([[0.0, 1.0]], np.float32))


def test_bytes_and_path_give_the_same_array(tmp_path, picture):
    path = save_gray(tmp_path / "x.png", picture)
    assert np.array_equal(decode(path.read_bytes()).pixels, decode(path).pixels)
    assert np.array_equal(decode(str(path)).pixels, decode(path).pixels)


def test_exif_orientation_is_applied(tmp_path, picture):
    source = Image.fromarray(_u8(picture), "L")  # 64 wide, 48 high
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    png = tmp_path / "rotated.png"
    source.save(png, exif=exif)
    image = decode(png).pixels
    assert image.shape == (64, 48)
    assert np.array_equal(image, np.rot90(picture, -1))
    jpeg = tmp_path / "rotated.jpeg"
    source.save(jpeg, exif=exif, quality=95)
    assert np.abs(decode(jpeg).pixels - np.rot90(picture, -1)).mean() < 2 / 255


# --- full-resolution decoding, reduced only for very large images ----------------------------------------------

def test_jpeg_is_decoded_at_full_resolution_so_it_matches_the_same_pixels_as_png(tmp_path):
    big = Image.fromarray(_u8(synthetic_xray(1600)), "L").resize((2000, 1600), Image.Resampling.BICUBIC)
    jpeg = tmp_path / "big.jpeg"
    big.save(jpeg, quality=90)
    with Image.open(jpeg) as im:
        Image.fromarray(np.asarray(im.convert("L"))).save(tmp_path / "big.png")  # the JPEG's own decoded pixels
    decoded = decode(jpeg)
    assert decoded.pixels.shape == (1600, 2000) and (decoded.width, decoded.height) == (2000, 1600)
    assert np.array_equal(decoded.pixels, decode(tmp_path / "big.png").pixels)


def test_images_above_4096_px_are_reduced_by_the_same_factor_in_every_format(tmp_path):
    from pneumoscan.data.images import reduce_factor

    assert reduce_factor(2752, 2000) == 1 and reduce_factor(4096, 4096) == 1
    assert reduce_factor(7000, 7000) == 2 and reduce_factor(9000, 300) == 4
    pixels = _u8(np.tile(synthetic_xray(700), (7, 7)))  # 4900 x 4900
    Image.fromarray(pixels).save(tmp_path / "big.png")
    Image.fromarray(pixels).save(tmp_path / "big.jpeg", quality=95)
    png, jpeg = decode(tmp_path / "big.png"), decode(tmp_path / "big.jpeg")
    assert png.pixels.shape == jpeg.pixels.shape == (2450, 2450)
    assert (png.width, png.height) == (jpeg.width, jpeg.height) == (4900, 4900)  # the stored size is reported
    prep = Preprocessing(size=224)
    diff = np.abs(prep.to_uint8(png.pixels).astype(int) - prep.to_uint8(jpeg.pixels).astype(int))
    assert diff.mean() < 1.0


# --- refusals, each with its exact message --------------------------------------------------------------------

def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (8000, 8000)).save(path)  # 64 MP declared in the header, a few kB on disk
    assert path.stat().st_size < 100_000
    assert MAX_PIXELS < 8000 * 8000
    assert _error(path) == (f"{path}: image is 8000x8000 pixels, above the 50 MP limit "
                            "(refused as a possible decompression bomb; see --max-megapixels)")


def test_huge_decompression_bomb_gets_the_same_kind_of_message(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (20000, 10000)).save(path)  # beyond Pillow's own limit, which refuses it inside open()
    assert _error(path) == (f"{path}: image has 200,000,000 pixels, above the 50 MP limit "
                            "(refused as a possible decompression bomb; see --max-megapixels)")


def test_truncated_jpeg(tmp_path, picture):
    buffer = io.BytesIO()
    Image.fromarray(_u8(synthetic_xray(256)), "L").save(buffer, "JPEG")
    path = tmp_path / "cut.jpeg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert _error(path).startswith(f"{path}: corrupt or truncated image (image file is truncated")


def test_jpeg_cut_inside_its_header(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(_u8(synthetic_xray(64)), "L").save(buffer, "JPEG")
    path = tmp_path / "head.jpeg"
    path.write_bytes(buffer.getvalue()[:100])
    assert _error(path) == f"{path}: corrupt or truncated image (Truncated File Read)"


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are not pixels\n")
    assert _error(path) == f"{path}: not a readable image (expected JPEG, PNG, TIFF, BMP, GIF, WebP, PNM (PGM/PPM) or DICOM)"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpeg"
    path.write_bytes(b"")
    assert _error(path) == f"{path}: empty file"


def test_empty_bytes_are_named_by_the_caller():
    assert _error(b"", name="upload.png") == "upload.png: empty file"
    assert _error(b"") == "<bytes>: empty file"


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.jpeg"
    assert _error(path) == f"{path}: file not found"


def test_folder_is_not_a_file(tmp_path):
    assert _error(tmp_path) == f"{tmp_path}: not a file"


def test_animated_image_is_refused(tmp_path):
    path = tmp_path / "anim.png"
    frames = [Image.new("L", (8, 8), v) for v in (0, 255)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert _error(path) == f"{path}: image has 2 frames; expected a single image"


# --- what decode reports beside the gray array ---------------------------------------------------------------

def test_decoded_image_reports_the_stored_size_and_format(tmp_path):
    path = tmp_path / "big.jpeg"
    Image.fromarray(_u8(synthetic_xray(256))[:, :200], "L").resize((1000, 1280)).save(path)
    decoded = decode(path)
    assert decoded.pixels.shape == (1280, 1000)
    assert (decoded.width, decoded.height, decoded.format) == (1000, 1280, "jpeg")
    assert decoded.colourfulness == 0.0 and decoded.dicom is None


def test_colourfulness_is_zero_for_gray_as_rgb_and_high_for_colour(tmp_path, picture):
    assert decode(save_gray(tmp_path / "rgb.png", picture, "RGB")).colourfulness == 0.0
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[:16, :, 0] = 255
    colour[16:, :, 2] = 255
    Image.fromarray(colour, "RGB").save(tmp_path / "colour.png")
    assert decode(tmp_path / "colour.png").colourfulness > 100


def test_tiff_and_bmp_decode_like_png(tmp_path, picture):
    png = decode(save_gray(tmp_path / "x.png", picture)).pixels
    for suffix in ("tif", "bmp"):
        decoded = decode(save_gray(tmp_path / f"x.{suffix}", picture))
        assert np.array_equal(decoded.pixels, png)
        assert decoded.format == {"tif": "tiff", "bmp": "bmp"}[suffix]


def test_an_array_is_a_decoded_image_without_a_header(picture):
    decoded = decode(picture)
    assert decoded.format == "array" and decoded.dicom is None and (decoded.width, decoded.height) == (64, 48)
    with pytest.raises(ImageReadError, match="array values must be finite and in"):
        decode(picture * 2)
