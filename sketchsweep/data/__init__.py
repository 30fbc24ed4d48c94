"""Data: numpy_bitmap folders, the synthetic sketch generator, splits and on-device batches."""

from sketchsweep.data.folder import DataError, Dataset, load_folder, stratified_split
from sketchsweep.data.synthetic import write_synthetic

__all__ = ["DataError", "Dataset", "load_folder", "stratified_split", "write_synthetic"]
