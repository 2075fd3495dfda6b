import numpy as np

from federation.demo_sites import DEMO_MIXES, split_by_patient, split_evenly
from models.readers import patient_id_from_provenance
from models.synthetic import synthetic_arrays


def patients(arrays):
    return {patient_id_from_provenance(str(p)) for p in arrays["provenance"]}


def test_demo_sites_hold_their_mix_and_share_no_patient():
    arrays = synthetic_arrays(n_classes=16, per_class=12, size=16, seed=0)
    sites = split_by_patient(arrays, DEMO_MIXES)
    for site, mix in zip(sites, DEMO_MIXES, strict=True):
        assert set(np.unique(site["labels"])) == set(mix)
        assert list(site["classes"]) == list(arrays["classes"])
    for i in range(3):
        for j in range(i + 1, 3):
            assert not patients(sites[i]) & patients(sites[j])
    assert sum(len(s["labels"]) for s in sites) == len(arrays["labels"])


def test_even_split_keeps_every_image_once():
    arrays = synthetic_arrays(n_classes=4, per_class=10, size=16, seed=1)
    sites = split_evenly(arrays, 3)
    assert sorted(np.concatenate([s["provenance"] for s in sites])) == sorted(arrays["provenance"])
