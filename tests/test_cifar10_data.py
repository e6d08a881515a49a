"""CIFAR-10 loading: image folders (directory, zips), binary batches, TFDS, the disk cache."""

import io
import os
import zipfile

import numpy as np
import pytest
from cifar10_files import (
  encode,
  tiny_split,
  write_binary,
  write_image_dir,
  write_image_zip,
)
from PIL import Image

from tasks import cifar10_data, cifar10_formats
from tasks.cifar10_formats import CLASSES, Cifar10Error


@pytest.fixture(autouse=True)
def own_environment(monkeypatch, tmp_path):
  """No $CIFAR10_DIR from the caller, and a cache that lives and dies with the test."""
  monkeypatch.delenv(cifar10_data.ENV_VAR, raising=False)
  monkeypatch.setenv(cifar10_data.CACHE_ENV_VAR, str(tmp_path / "cache"))


def _assert_split(split, images, labels):
  assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
  np.testing.assert_array_equal(np.asarray(split.images), images)
  np.testing.assert_array_equal(np.asarray(split.labels), labels)


@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-bin"])
def test_binary_batches(tmp_path, subdir):
  written = write_binary(str(tmp_path / "data" / subdir), train_per_batch=2, test=3)
  for split in ("train", "test"):
    _assert_split(cifar10_data.load(split, cifar10_dir=str(tmp_path / "data")), *written[split])
  assert cifar10_data.load("train", cifar10_dir=str(tmp_path / "data")).labels.shape == (10,)


def test_binary_record_is_label_then_channel_major_planes(tmp_path):
  c, y, x = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
  planes = (c * 100 + y * 3 + x) % 256  # value of channel c at row y, column x
  path = tmp_path / "data_batch_1.bin"
  path.write_bytes(bytes([7]) + planes.astype(np.uint8).tobytes())
  images, labels = cifar10_formats.read_binary_batch(str(path))
  assert labels.tolist() == [7] and images.shape == (1, 32, 32, 3)
  np.testing.assert_array_equal(images[0], planes.transpose(1, 2, 0))


def test_truncated_and_missing_batches_are_named(tmp_path):
  write_binary(str(tmp_path))
  path = tmp_path / "data_batch_3.bin"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(Cifar10Error, match="truncated") as e:
    cifar10_data.load("train", cifar10_dir=str(tmp_path))
  assert str(path) in str(e.value)
  os.remove(tmp_path / "test_batch.bin")
  with pytest.raises(Cifar10Error, match="test_batch.bin is missing"):
    cifar10_data.load("test", cifar10_dir=str(tmp_path))


def test_image_folder_directory_of_pngs(tmp_path):
  splits = {"train": tiny_split(2, seed=0), "test": tiny_split(1, seed=1)}
  for split, (images, labels) in splits.items():
    write_image_dir(str(tmp_path / "folders"), split, images, labels, "PNG")
  (tmp_path / "folders" / "train" / "cat" / ".DS_Store").write_bytes(b"ignored")
  for split, (images, labels) in splits.items():
    _assert_split(cifar10_data.load(split, cifar10_dir=str(tmp_path / "folders")), images, labels)


def test_shipped_layout_train_zip_and_test_zip_of_jpegs(tmp_path):
  """As ../shared/data/cifar10: train.zip holds train/<class>/NNNN.jpg, test.zip test/..."""
  for split, seed in (("train", 0), ("test", 1)):
    write_image_zip(str(tmp_path / f"{split}.zip"), {split: tiny_split(2, seed)}, "JPEG")
  for split, seed in (("train", 0), ("test", 1)):
    images, labels = tiny_split(2, seed)
    loaded = cifar10_data.load(split, cifar10_dir=str(tmp_path))
    np.testing.assert_array_equal(np.asarray(loaded.labels), labels)
    # JPEG is lossy: the pixels are PIL's decoding of the stored bytes, close to the originals.
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(encode(i, "JPEG")))) for i in images])
    np.testing.assert_array_equal(np.asarray(loaded.images), decoded)
    assert np.abs(decoded.astype(int) - images).mean() < 3


@pytest.mark.parametrize("layout", ["one_zip_both_splits", "split_zip_without_prefix"])
def test_other_zip_layouts(tmp_path, layout):
  splits = {"train": tiny_split(1, seed=0), "test": tiny_split(1, seed=1)}
  if layout == "one_zip_both_splits":
    source = write_image_zip(str(tmp_path / "cifar10.zip"), splits, "PNG")
  else:
    source = str(tmp_path)
    for split, arrays in splits.items():
      write_image_zip(str(tmp_path / f"{split}.zip"), {split: arrays}, "PNG", prefix=False)
  for split, (images, labels) in splits.items():
    _assert_split(cifar10_data.load(split, cifar10_dir=source), images, labels)


@pytest.mark.parametrize("container", ["directory", "zip"])
def test_corrupt_image_is_named(tmp_path, container):
  images, labels = tiny_split(1)
  if container == "directory":
    write_image_dir(str(tmp_path), "train", images, labels, "PNG")
    (tmp_path / "train" / "dog" / "0005.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    bad = os.path.join(tmp_path, "train", "dog", "0005.png")
  else:
    write_image_zip(str(tmp_path / "train.zip"), {"train": (images, labels)}, "JPEG")
    with zipfile.ZipFile(tmp_path / "train.zip", "a") as archive:
      archive.writestr("train/dog/9999.jpg", encode(images[0], "JPEG")[:60])
    bad = f"{tmp_path / 'train.zip'}:train/dog/9999.jpg"
  with pytest.raises(Cifar10Error, match="Cannot decode image.*corrupt") as e:
    cifar10_data.load("train", cifar10_dir=str(tmp_path))
  assert bad in str(e.value)


def test_wrong_image_size_unknown_and_missing_class_folders(tmp_path):
  images, labels = tiny_split(1)
  write_image_dir(str(tmp_path), "train", images, labels, "PNG")
  small = tmp_path / "train" / "cat" / "0003.png"
  small.write_bytes(encode(np.zeros((16, 16, 3), np.uint8), "PNG"))
  with pytest.raises(Cifar10Error, match="0003.png is 16 x 16 pixels"):
    cifar10_data.load("train", cifar10_dir=str(tmp_path))
  small.write_bytes(encode(images[3], "PNG"))
  os.rename(tmp_path / "train" / "cat", tmp_path / "train" / "kitten")
  with pytest.raises(Cifar10Error, match="kitten/0003.png"):
    cifar10_data.load("train", cifar10_dir=str(tmp_path))
  os.rename(tmp_path / "train" / "kitten", tmp_path / "elsewhere")
  with pytest.raises(Cifar10Error, match=r"no images of class\(es\) \['cat'\]"):
    cifar10_data.load("train", cifar10_dir=str(tmp_path))


@pytest.mark.parametrize("where", ["missing", "empty", "no_test_split", "not_a_zip"])
def test_missing_or_malformed_source_names_path_and_layouts(tmp_path, where):
  path = tmp_path / "cifar"
  if where in ("empty", "no_test_split"):
    path.mkdir()
  if where == "no_test_split":
    write_image_dir(str(path), "train", *tiny_split(1), "PNG")
  if where == "not_a_zip":
    path = tmp_path / "cifar.zip"
    path.write_bytes(b"not a zip")
  with pytest.raises(Cifar10Error) as e:
    cifar10_data.load("test", cifar10_dir=str(path))
  message = str(e.value)
  assert str(path) in message
  if where != "not_a_zip":
    assert all(s in message for s in ("(1) image folders", "(2) the official binary", "(3) a"))


def test_nothing_named_and_no_tfds_says_what_to_do(tmp_path):
  with pytest.raises(Cifar10Error, match="Nothing is downloaded.*CIFAR10_DIR"):
    cifar10_data.load("train", data_dir=str(tmp_path / "empty_tfds"))


def test_disk_cache_is_used_and_follows_the_files(tmp_path, monkeypatch):
  images, labels = tiny_split(1)
  write_image_dir(str(tmp_path / "src"), "train", images, labels, "PNG")
  source = cifar10_data.find_source(str(tmp_path / "src"))
  cache = str(tmp_path / "my_cache")
  cifar10_data.read_split(source, "train", cache)
  written = [os.path.join(d, n) for d, _, names in os.walk(cache) for n in names]
  assert len(written) == 1 and written[0].endswith(".npz")
  assert not any(n.endswith(".npz") for _, _, names in os.walk(tmp_path / "src") for n in names)

  def no_decoding(*args):
    raise AssertionError("decoded although the cache is fresh")

  with monkeypatch.context() as m:
    m.setattr(cifar10_formats, "read_image_dir", no_decoding)
    np.testing.assert_array_equal(cifar10_data.read_split(source, "train", cache)[0], images)
  # A changed file changes the key: the new pixels are decoded, not the cached ones served.
  changed = images.copy()
  changed[4] = 255 - changed[4]
  (tmp_path / "src" / "train" / "deer" / "0004.png").write_bytes(encode(changed[4], "PNG"))
  np.testing.assert_array_equal(cifar10_data.read_split(source, "train", cache)[0], changed)
  # A damaged cache file is decoded again, not trusted.
  for path in [os.path.join(d, n) for d, _, names in os.walk(cache) for n in names]:
    with open(path, "wb") as f:
      f.write(b"PK garbage")
  np.testing.assert_array_equal(cifar10_data.read_split(source, "train", cache)[0], changed)


def test_cache_inside_the_source_is_refused_and_unwritable_cache_warns(tmp_path):
  write_image_dir(str(tmp_path / "src"), "train", *tiny_split(1), "PNG")
  source = cifar10_data.find_source(str(tmp_path / "src"))
  with pytest.raises(ValueError, match="lies inside the data source"):
    cifar10_data.read_split(source, "train", str(tmp_path / "src" / "train" / ".cache"))
  (tmp_path / "a_file").write_bytes(b"")
  with pytest.warns(UserWarning, match="Cannot write the CIFAR-10 cache"):
    images, _ = cifar10_data.read_split(source, "train", str(tmp_path / "a_file" / "cache"))
  assert images.shape == (10, 32, 32, 3)


def test_directory_from_environment_and_device_copy_cached(tmp_path, monkeypatch):
  written = write_binary(str(tmp_path))
  monkeypatch.setenv(cifar10_data.ENV_VAR, str(tmp_path))
  first = cifar10_data.load("test")
  np.testing.assert_array_equal(np.asarray(first.labels), written["test"][1])
  assert cifar10_data.load("test", cifar10_dir=str(tmp_path)).images is first.images


def test_class_subset_keeps_and_relabels_in_the_given_order(tmp_path):
  images, labels = tiny_split(2)
  write_image_dir(str(tmp_path), "train", images, labels, "PNG")
  subset = cifar10_data.load("train", cifar10_dir=str(tmp_path), classes=[3, "airplane"])
  keep = np.concatenate([np.flatnonzero(labels == 3), np.flatnonzero(labels == 0)])
  order = np.argsort(np.asarray(subset.labels), kind="stable")
  np.testing.assert_array_equal(np.asarray(subset.labels)[order], [0, 0, 1, 1])
  np.testing.assert_array_equal(np.asarray(subset.images)[order], images[keep])
  assert cifar10_data.class_indices(list(CLASSES)) is None
  for bad in ([3], [1, 1], [0, 10], ["kitten", 1]):
    with pytest.raises(ValueError, match="classes="):
      cifar10_data.class_indices(bad)


def test_tfds_prepared_data_set(tmp_path, monkeypatch):
  """Prepares TFDS's own cifar10 builder from tiny binary batches, without TensorFlow or network.

  Replaced: the download (our files instead), reading a batch (tf.io.gfile) and PNG encoding
  (tf.image); the builder's own record parsing and array_record writing run unchanged.
  """
  tfds = pytest.importorskip("tensorflow_datasets")
  from tensorflow_datasets.image_classification import cifar as tfds_cifar

  batches = tmp_path / "download" / "cifar-10-batches-bin"
  written = write_binary(str(batches))
  (batches / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n")

  def load_data(path, labels_number=1):
    records = np.frombuffer(open(path, "rb").read(), np.uint8).reshape(-1, 3073)
    for record in records:
      yield record[:1], record[1:].reshape(3, 32, 32).transpose(1, 2, 0)

  class Downloads:
    downloaded_size = 0

    def download_and_extract(self, urls):
      return str(tmp_path / "download")

  monkeypatch.setattr(tfds_cifar, "_load_data", load_data)
  monkeypatch.setattr(tfds.features.Image, "encode_example", lambda self, x: encode(x, "PNG"))
  data_dir = str(tmp_path / "tfds")
  assert cifar10_formats.tfds_dataset_dir(data_dir) is None
  builder = tfds.builder("cifar10", data_dir=data_dir, file_format="array_record")
  builder._make_download_manager = lambda *args, **kwargs: Downloads()
  try:
    builder.download_and_prepare()
  except ModuleNotFoundError as e:
    pytest.skip(f"tfds cannot prepare even a tiny cifar10 here without {e.name}: {e}")
  for split in ("train", "test"):
    loaded = cifar10_data.load(split, data_dir=data_dir)
    images, labels = written[split]
    # tfds shuffles records when it writes them; compare in a canonical order.
    key = lambda imgs: np.lexsort(imgs.reshape(len(imgs), -1)[:, :8].T)
    got = np.asarray(loaded.images)
    np.testing.assert_array_equal(got[key(got)], images[key(images)])
    np.testing.assert_array_equal(np.asarray(loaded.labels)[key(got)], labels[key(images)])
