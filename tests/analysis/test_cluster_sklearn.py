"""The routing table's MI / NMI / entropy now come from scikit-learn and scipy (issue 28 item 5):
pinned to midol's former own code on a real routing table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from midol.utils.cluster_metrics import entropy, mutual_information, normalized_mutual_info

# the demo M-IDoL run's routing table (317 real images; experts x xray, pathology, oct, fundus)
DEMO = [[1, 0, 0, 0], [59, 30, 0, 0], [0, 2, 16, 200], [0, 9, 0, 0]]


def test_nmi_of_a_real_routing_table_equals_midols_former_value():
    # 0.7133128398: midol's own formula before the swap (experiments/libraries/cluster_compare.py)
    assert normalized_mutual_info(DEMO) == pytest.approx(0.7133128398, abs=1e-10)
    assert normalized_mutual_info(torch.tensor(DEMO, dtype=torch.float32)) == pytest.approx(0.7133128398, abs=1e-10)
    joint = np.array(DEMO, dtype=np.float64) / 317
    outer = joint.sum(1, keepdims=True) @ joint.sum(0, keepdims=True)
    nz = joint > 0
    assert mutual_information(DEMO) == pytest.approx(float((joint[nz] * np.log(joint[nz] / outer[nz])).sum()),
                                                     rel=1e-12)
    q = np.array([1, 89, 218, 9]) / 317
    assert entropy([1, 89, 218, 9]) == pytest.approx(float(-(q * np.log(q)).sum()), rel=1e-12)


def test_fractional_counts_and_negative_entropy_inputs_raise_one_line():
    with pytest.raises(ValueError, match="whole numbers"):
        normalized_mutual_info([[1.5, 2.0], [0.0, 3.0]])
    with pytest.raises(ValueError, match=">= 0"):
        entropy([1.0, -1.0])
