"""The names the data package decides by: the datasets it reads itself, and the splits it looks for."""

__all__ = ["BUILTIN", "TEST_SPLITS", "EVAL_SPLITS"]

# Read without tensorflow-datasets' catalogue (`train.data.load.load_dataset`).
BUILTIN = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "folder")
# The split a dataset is tested on: the first of these it has (other than the one named for validation).
TEST_SPLITS = ("test", "validation", "val")
# The splits `train.data.load_split` scores by default, in order: ImageNet's labelled held-out images are
# its validation split (its test split has no labels).
EVAL_SPLITS = ("validation", "val", "test")
