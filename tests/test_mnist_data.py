"""MNIST loading: IDX files (plain, gzipped, damaged) and a prepared TFDS data set."""

import io
import os

import numpy as np
import pytest
from mnist_files import STEMS, idx_bytes, tiny_split, write_idx, write_mnist

from tasks import mnist_data


@pytest.fixture(autouse=True)
def no_env_dir(monkeypatch):
  monkeypatch.delenv(mnist_data.ENV_VAR, raising=False)


@pytest.mark.parametrize("gz", [False, True])
def test_reads_the_four_files(tmp_path, gz):
  written = write_mnist(str(tmp_path), gz=gz)
  for split in ("train", "test"):
    split_data = mnist_data.load(split, mnist_dir=str(tmp_path))
    images, labels = written[split]
    np.testing.assert_array_equal(np.asarray(split_data.images), images)
    np.testing.assert_array_equal(np.asarray(split_data.labels), labels)
    assert split_data.images.dtype == np.uint8 and split_data.labels.dtype == np.int32


def test_directory_from_environment_and_cached(tmp_path, monkeypatch):
  written = write_mnist(str(tmp_path))
  monkeypatch.setenv(mnist_data.ENV_VAR, str(tmp_path))
  first = mnist_data.load("test")
  np.testing.assert_array_equal(np.asarray(first.labels), written["test"][1])
  assert mnist_data.load("test", mnist_dir=str(tmp_path)).images is first.images


def test_truncated_file_names_file_and_fix(tmp_path):
  write_mnist(str(tmp_path))
  path = os.path.join(tmp_path, STEMS["train"][0])
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:-100])
  with pytest.raises(mnist_data.MnistError, match="truncated") as e:
    mnist_data.load("train", mnist_dir=str(tmp_path))
  assert path in str(e.value)


def test_truncated_gzip(tmp_path):
  path = write_idx(str(tmp_path / "x-idx1-ubyte"), np.arange(5000) % 10, gz=True)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(mnist_data.MnistError, match="damaged"):
    mnist_data.read_idx(path)


def test_wrong_magic_number(tmp_path):
  path = str(tmp_path / "bad")
  with open(path, "wb") as f:
    f.write(b"\x1f\x8b" + idx_bytes(np.zeros((2, 28, 28)))[2:])
  with pytest.raises(mnist_data.MnistError, match="not an IDX file"):
    mnist_data.read_idx(path)
  with open(path, "wb") as f:  # Right zeros, wrong type byte (0x0D: float32).
    f.write(b"\x00\x00\x0d\x01" + np.asarray([1], ">u4").tobytes() + b"\x00" * 4)
  with pytest.raises(mnist_data.MnistError, match="type 0x0d"):
    mnist_data.read_idx(path)


def test_label_out_of_range_and_mismatched_counts(tmp_path):
  write_mnist(str(tmp_path))
  labels = os.path.join(tmp_path, STEMS["test"][1])
  write_idx(labels, np.full(5, 10))
  with pytest.raises(mnist_data.MnistError, match="label 10 is out of range"):
    mnist_data.load("test", mnist_dir=str(tmp_path))
  write_idx(labels, np.zeros(4))
  with pytest.raises(mnist_data.MnistError, match="5 images but labels shaped"):
    mnist_data.load("test", mnist_dir=str(tmp_path))


def test_missing_file_and_missing_directory(tmp_path):
  write_mnist(str(tmp_path), sizes=(("train", 3),))
  with pytest.raises(mnist_data.MnistError, match="t10k-images-idx3-ubyte.*MNIST_DIR"):
    mnist_data.load("test", mnist_dir=str(tmp_path))
  with pytest.raises(mnist_data.MnistError, match="does not exist"):
    mnist_data.load("train", mnist_dir=str(tmp_path / "nowhere"))


def test_no_source_says_what_to_do(tmp_path):
  with pytest.raises(mnist_data.MnistError, match="Nothing is downloaded.*MNIST_DIR"):
    mnist_data.load("train", data_dir=str(tmp_path / "empty_tfds"))


def _build_tiny_tfds_mnist(data_dir, files, sizes, monkeypatch):
  """Prepares TFDS's own ``mnist`` builder from tiny IDX files, without TensorFlow or network.

  Three TensorFlow-only or network-only steps of that builder are replaced: the download (our
  files instead), reading the IDX files (tf.io.gfile) and PNG encoding (PIL instead of tf.image).
  """
  tfds = pytest.importorskip("tensorflow_datasets")
  pil_image = pytest.importorskip("PIL.Image")
  from tensorflow_datasets.image_classification import mnist as tfds_mnist

  def read(path, num, offset):
    with open(path, "rb") as f:
      return np.frombuffer(f.read(), np.uint8, offset=offset)[: num * (784 if offset == 16 else 1)]

  def encode_png(self, image):
    del self
    buffer = io.BytesIO()
    pil_image.fromarray(np.asarray(image)[..., 0]).save(buffer, format="PNG")
    return buffer.getvalue()

  class Downloads:
    downloaded_size = 0

    def download_and_extract(self, urls):
      del urls
      return files

  monkeypatch.setattr(tfds_mnist, "_TRAIN_EXAMPLES", sizes["train"])
  monkeypatch.setattr(tfds_mnist, "_TEST_EXAMPLES", sizes["test"])
  monkeypatch.setattr(
    tfds_mnist, "_extract_mnist_images", lambda p, n: read(p, n, 16).reshape(n, 28, 28, 1)
  )
  monkeypatch.setattr(tfds_mnist, "_extract_mnist_labels", lambda p, n: read(p, n, 8))
  monkeypatch.setattr(tfds.features.Image, "encode_example", encode_png)
  builder = tfds.builder("mnist", data_dir=data_dir, file_format="array_record")
  builder._make_download_manager = lambda *args, **kwargs: Downloads()
  try:
    builder.download_and_prepare()
  except ModuleNotFoundError as e:
    pytest.skip(f"tfds cannot prepare even a tiny mnist here without {e.name}: {e}")


def test_tfds_prepared_data_set(tmp_path, monkeypatch):
  sizes = {"train": 6, "test": 4}
  files, expected = {}, {}
  for seed, split in enumerate(("train", "test")):
    images, labels = tiny_split(sizes[split], seed)
    files[f"{split}_data"] = write_idx(str(tmp_path / f"{split}-images"), images)
    files[f"{split}_labels"] = write_idx(str(tmp_path / f"{split}-labels"), labels)
    expected[split] = (images, labels)
  data_dir = str(tmp_path / "tfds")
  assert not mnist_data.tfds_prepared(data_dir)
  _build_tiny_tfds_mnist(data_dir, files, sizes, monkeypatch)
  assert mnist_data.tfds_prepared(data_dir)
  for split in ("train", "test"):
    loaded = mnist_data.load(split, data_dir=data_dir)
    images, labels = expected[split]
    # tfds shuffles records when it writes them; compare as sets of (label, image) pairs.
    order = np.argsort(np.asarray(loaded.labels), kind="stable")
    np.testing.assert_array_equal(np.asarray(loaded.labels)[order], np.sort(labels))
    got_images, got_labels = np.asarray(loaded.images)[order], np.asarray(loaded.labels)[order]
    for got, label in zip(got_images, got_labels, strict=True):
      assert any(np.array_equal(got, images[i]) for i in np.flatnonzero(labels == label))
