"""The labelled-case check behind the adapt page's warning (models.ood.support_outlier_scores):
the same score as a new case gets, with the case left out of its own reference."""

from __future__ import annotations

import torch

from models.ood import FLAG_AT, support_outlier_scores, unusual_scores


def test_each_case_is_scored_against_the_others_only() -> None:
    torch.manual_seed(0)
    features, images = torch.randn(9, 16), torch.rand(9, 3, 16, 16)
    scores = support_outlier_scores(support_features=features, support_images=images)
    for i in range(9):
        others = [j for j in range(9) if j != i]
        expected = unusual_scores(
            support_features=features[others],
            case_features=features[i : i + 1],
            support_images=images[others],
            case_images=images[i : i + 1],
        )
        torch.testing.assert_close(scores[i : i + 1], expected)


def test_a_colour_picture_among_grey_studies_is_flagged_and_two_cases_are_not_scored() -> None:
    torch.manual_seed(1)
    grey = torch.rand(8, 1, 16, 16).repeat(1, 3, 1, 1)  # grey studies stored as RGB
    photo = torch.rand(1, 3, 16, 16)  # colourful
    images = torch.cat([grey, photo])
    features = torch.randn(9, 8)
    scores = support_outlier_scores(support_features=features, support_images=images)
    assert scores[-1] > FLAG_AT and (scores[:-1] <= FLAG_AT).all()
    two = support_outlier_scores(support_features=features[:2], support_images=images[:2])
    assert two.tolist() == [0.0, 0.0]
