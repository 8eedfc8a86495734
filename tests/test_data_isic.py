"""ISIC 2019, ISIC 2018 (isic-gt) and ISIC 2020 loaders on fixtures in the official formats."""

import pandas as pd
import pytest

from common.data.catalog import DataError
from common.data.formats import load_catalog
from common.data.formats.isic2019 import FLAMBY_ISIC2019_CENTRES
from tests.conftest import write_jpeg

ISIC2019_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def _one_hot(label, columns):
    return [1.0 if c == label else 0.0 for c in columns]


@pytest.fixture()
def isic2019_root(tmp_path):
    """Official layout: GroundTruth + Metadata CSVs, ISIC_2019_Training_Input/, HAM10000 metadata."""
    root = tmp_path / "isic2019"
    rows = [  # image, lesion_id, label, HAM dataset
        ("ISIC_0000001", "BCN_0000001", "MEL", None),
        ("ISIC_0000002", "BCN_0000001", "MEL", None),
        ("ISIC_0000003", "MSK4_0000003", "NV", None),
        ("ISIC_0000004", "HAM_0000004", "BKL", "vidir_molemax"),
        ("ISIC_0000005", "HAM_0000005", "NV", "vidir_modern"),
        ("ISIC_0000006", "HAM_0000006", "BCC", "rosendahl"),
        ("ISIC_0000007", "HAM_0000007", "DF", "vienna_dias"),
        ("ISIC_0000008", None, "SCC", None),  # no lesion_id: no centre in FLamby's split
        ("ISIC_0000009", "BCN_0000009", "AK", None),  # image missing on disk
    ]
    gt = pd.DataFrame([[image, *_one_hot(label, ISIC2019_CLASSES)] for image, _, label, _ in rows],
                      columns=["image", *ISIC2019_CLASSES])
    root.mkdir()
    gt.to_csv(root / "ISIC_2019_Training_GroundTruth.csv", index=False)
    meta = pd.DataFrame({"image": [r[0] for r in rows], "age_approx": 50, "anatom_site_general": "back",
                         "lesion_id": [r[1] for r in rows], "sex": "female"})
    meta.to_csv(root / "ISIC_2019_Training_Metadata.csv", index=False)
    ham = pd.DataFrame([(lesion, image, "nv", "histo", 50, "male", "back", site)
                        for image, lesion, _, site in rows if site],
                       columns=["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"])
    ham.to_csv(root / "HAM10000_metadata.csv", index=False)
    for i, (image, *_rest) in enumerate(rows):
        if image != "ISIC_0000009":
            write_jpeg(root / "ISIC_2019_Training_Input" / f"{image}.jpg", seed=i)
    return root


def test_isic2019_flamby_centres_labels_and_skips(isic2019_root, data_config):
    catalog = load_catalog(data_config("data.format=isic2019", f"data.root={isic2019_root}").data)
    by_image = catalog.frame.set_index("image_id")
    assert by_image.loc["ISIC_0000001", "site"] == "BCN"
    assert by_image.loc["ISIC_0000003", "site"] == "MSK"
    assert by_image.loc["ISIC_0000004", "site"] == "HAM_vidir_molemax"
    assert by_image.loc["ISIC_0000006", "site"] == "HAM_rosendahl"
    assert by_image.loc["ISIC_0000007", "site"] == "HAM_vienna_dias"
    assert set(catalog.sites) <= set(FLAMBY_ISIC2019_CENTRES)
    assert by_image.loc["ISIC_0000002", "group"] == "BCN_0000001"
    assert by_image.loc["ISIC_0000006", "label"] == "BCC"
    reasons = catalog.skipped.set_index("image_id")["reason"]
    assert reasons["ISIC_0000008"].startswith("no centre")
    assert reasons["ISIC_0000009"] == "image file missing"
    assert len(catalog) == 7


def test_isic2019_non_one_hot_row_is_a_clear_error(isic2019_root, data_config):
    gt_path = isic2019_root / "ISIC_2019_Training_GroundTruth.csv"
    gt = pd.read_csv(gt_path)
    gt.loc[0, "NV"] = 1.0
    gt.to_csv(gt_path, index=False)
    with pytest.raises(DataError, match="not one-hot"):
        load_catalog(data_config("data.format=isic2019", f"data.root={isic2019_root}").data)


@pytest.mark.parametrize("values", [(0.7, 0.3), (-1.0, 2.0)])
def test_class_values_other_than_0_and_1_are_refused_not_read_as_the_larger(isic2019_root, data_config, values):
    """Found by review: `(values > 0.5).sum() == 1` read 0.7/0.3 as the first class and -1/2 as the second."""
    gt_path = isic2019_root / "ISIC_2019_Training_GroundTruth.csv"
    gt = pd.read_csv(gt_path)
    first, second = [c for c in gt.columns if c != "image"][:2]
    gt.loc[0, [first, second]] = values
    gt.loc[0, [c for c in gt.columns if c not in ("image", first, second)]] = 0.0
    gt.to_csv(gt_path, index=False)
    with pytest.raises(DataError, match="row 2 .* in column"):
        load_catalog(data_config("data.format=isic2019", f"data.root={isic2019_root}").data)


def test_isic2018_ground_truth_with_lesion_groupings(tmp_path, data_config):
    root = tmp_path / "isic2018"
    columns = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    images = [f"ISIC_00{i:05d}" for i in range(7)]
    gt = pd.DataFrame([[image, *_one_hot(columns[i], columns)] for i, image in enumerate(images)],
                      columns=["image", *columns])
    (root / "ISIC2018_Task3_Training_GroundTruth").mkdir(parents=True)
    gt.to_csv(root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv", index=False)
    pd.DataFrame({"image": images, "lesion_id": ["HAM_1", "HAM_1", "HAM_2", "HAM_3", "HAM_4", "HAM_5", "HAM_6"],
                  "diagnosis_confirm_type": "histopathology"}).to_csv(root / "ISIC2018_Task3_Training_LesionGroupings.csv", index=False)
    for i, image in enumerate(images):
        write_jpeg(root / "ISIC2018_Task3_Training_Input" / f"{image}.jpg", seed=i)
    catalog = load_catalog(data_config("data.format=isic-gt", f"data.root={root}").data)
    assert catalog.classes == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC"]  # AKIEC -> AK, explicit
    by_image = catalog.frame.set_index("image_id")
    assert by_image.loc[images[3], "label"] == "AK"
    assert by_image.loc[images[0], "group"] == by_image.loc[images[1], "group"] == "HAM_1"


def test_isic2020_binary_target_grouped_by_patient(tmp_path, data_config):
    root = tmp_path / "isic2020"
    names = [f"ISIC_{i:07d}" for i in range(6)]
    pd.DataFrame({"image_name": names, "patient_id": ["IP_1", "IP_1", "IP_2", "IP_3", "IP_3", "IP_4"],
                  "sex": "male", "age_approx": 45, "anatom_site_general_challenge": "torso",
                  "diagnosis": "unknown", "benign_malignant": "benign", "target": [0, 1, 0, 0, 1, 0]}
                 ).to_csv((root.mkdir() or root) / "train.csv", index=False)
    for i, name in enumerate(names):
        write_jpeg(root / "jpeg" / "train" / f"{name}.jpg", seed=i)
    catalog = load_catalog(data_config("data.format=isic2020", f"data.root={root}").data)
    assert catalog.classes == ["MEL", "OTHER"]
    assert catalog.frame.set_index("image_id").loc[names[1], "label"] == "MEL"
    assert catalog.frame.set_index("image_id").loc[names[4], "group"] == "IP_3"


def test_missing_root_or_csv_names_the_fix(tmp_path, data_config):
    with pytest.raises(DataError, match="data.root is not set"):
        load_catalog(data_config("data.format=isic2019", "data.root=").data)
    with pytest.raises(DataError, match="ISIC_2019_Training_GroundTruth.csv"):
        load_catalog(data_config("data.format=isic2019", f"data.root={tmp_path}").data)
