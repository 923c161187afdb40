from __future__ import annotations

import json
import math
import os
import shutil
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

import pydicom
import pytest

from dinox.data import ingest
from dinox.data.annotations import (NODULE_COLUMNS, NODULES_TABLE, AnnotationError, SeriesSlices, consensus,
                                    lidc_rows, parse_lidc_xml, read_table, reader_names, to_lidc_xml)
from dinox.data.synth import generate_dataset

NS = "http://www.nih.gov"


def _roi(z, sop, points, inclusion="TRUE") -> str:
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in points)
    return (f"<roi><imageZposition>{z}</imageZposition><imageSOP_UID>{sop}</imageSOP_UID>"
            f"<inclusion>{inclusion}</inclusion>{edges}</roi>")


def _square(x0, y0, x1, y1) -> list[tuple[int, int]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]


CHARS = ("<characteristics><subtlety>4</subtlety><internalStructure>1</internalStructure>"
         "<calcification>6</calcification><sphericity>3</sphericity><margin>4</margin>"
         "<lobulation>2</lobulation><spiculation>1</spiculation><texture>5</texture>"
         "<malignancy>{m}</malignancy></characteristics>")

# Three readers as LIDC files have them (namespace, header spelling SeriesInstanceUid, a
# comment, z with trailing blanks). Reader 111 and 222 outline one nodule on slices 1-2
# (222 by z only: no SOP UID), 111 also on a z that is no slice of the series; 333 alone
# saw a nodule < 3 mm (one point, no characteristics) and marked a non-nodule; 222's second
# nodule has a non-numeric coordinate.
HAND_XML = f"""<?xml version="1.0" encoding="UTF-8"?>
<LidcReadMessage xmlns="{NS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" uid="1.9">
  <ResponseHeader><Version>1.8.1</Version><SeriesInstanceUid>1.2.3</SeriesInstanceUid>
    <StudyInstanceUID>1.2</StudyInstanceUID></ResponseHeader>
  <readingSession>
    <annotationVersion>3.12</annotationVersion>
    <servicingRadiologistID>111</servicingRadiologistID>
    <!-- first reader -->
    <unblindedReadNodule><noduleID>Nodule 001</noduleID>{CHARS.format(m=4)}
      {_roi("-12.500000 ", "1.2.3.1", _square(10, 20, 14, 25))}
      {_roi("-15.000000 ", "1.2.3.2", _square(11, 21, 13, 24))}
      {_roi("-15.000000 ", "1.2.3.2", [(12, 22), (12, 23)], inclusion="FALSE")}
      {_roi("-400.0", "1.2.3.99", _square(11, 21, 13, 24))}
    </unblindedReadNodule>
  </readingSession>
  <readingSession>
    <servicingRadiologistID>222</servicingRadiologistID>
    <unblindedReadNodule><noduleID>IL057_127364</noduleID>{CHARS.format(m=3)}
      {_roi("-12.4", "", _square(9, 19, 15, 26))}
      {_roi("-14.9", "", _square(10, 20, 13, 24))}
    </unblindedReadNodule>
    <unblindedReadNodule><noduleID>IL057_2</noduleID>
      {_roi("-12.5", "1.2.3.1", [("twelve", 3), (4, 5)])}
    </unblindedReadNodule>
  </readingSession>
  <readingSession>
    <servicingRadiologistID>333</servicingRadiologistID>
    <unblindedReadNodule><noduleID>5</noduleID>{_roi("-10.0", "1.2.3.0", [(40, 41)])}</unblindedReadNodule>
    <nonNodule><nonNoduleID>Non-nodule 001</nonNoduleID><imageZposition>-17.5</imageZposition>
      <imageSOP_UID>1.2.3.3</imageSOP_UID><locus><xCoord>50</xCoord><yCoord>7</yCoord></locus></nonNodule>
  </readingSession>
</LidcReadMessage>
"""


def _slices(n: int = 4) -> SeriesSlices:
    """Slice k: SOP 1.2.3.k at z = -10 - 2.5 k (LIDC lists z descending), 0.7 mm pixels."""
    return SeriesSlices(series_id="S", patient_id="P", series_uid="1.2.3", sop_uids=[f"1.2.3.{k}" for k in range(n)],
                        z=[-10.0 - 2.5 * k for k in range(n)], spacing_z=2.5, spacing_yx=(0.7, 0.7),
                        shape_yx=(64, 64))


def test_parse_hand_written_lidc_xml():
    read = parse_lidc_xml(HAND_XML)
    assert (read.series_uid, read.study_uid) == ("1.2.3", "1.2")
    assert reader_names(read) == ["111", "222", "333"]
    marks = {(s.reader, m.mark_id): m for s in read.sessions for m in s.marks}
    assert set(marks) == {("111", "Nodule 001"), ("222", "IL057_127364"), ("333", "5"), ("333", "Non-nodule 001")}
    first = marks[("111", "Nodule 001")]
    assert first.kind == "nodule" and len(first.rois) == 4
    assert first.characteristics == {"subtlety": 4, "internalStructure": 1, "calcification": 6, "sphericity": 3,
                                     "margin": 4, "lobulation": 2, "spiculation": 1, "texture": 5, "malignancy": 4}
    assert first.rois[0].z == -12.5 and first.rois[0].sop_uid == "1.2.3.1"
    assert first.rois[0].points[:2] == ((10, 20), (14, 20))
    assert [r.inclusion for r in first.rois] == [True, True, False, True]
    small = marks[("333", "5")]
    assert small.kind == "small_nodule" and small.characteristics == {} and small.rois[0].points == ((40, 41),)
    non = marks[("333", "Non-nodule 001")]
    assert non.kind == "non_nodule" and non.rois[0].points == ((50, 7),) and non.rois[0].z == -17.5
    # the bad nodule is left out and described; the rest of the file is used
    assert len(read.problems) == 1 and "IL057_2" in read.problems[0] and "xCoord" in read.problems[0]



def test_an_unreadable_roi_leaves_out_that_slice_not_the_nodule():
    """Dropping the whole nodule for one bad roi left its other slices unmarked, and a slice
    without a mark is a negative to the probe."""
    rois = (_roi("-12.5", "1.2.3.1", _square(10, 20, 14, 25)) + "<roi><imageZposition>-15.0</imageZposition>"
            "<imageSOP_UID>1.2.3.2</imageSOP_UID><inclusion>TRUE</inclusion></roi>"
            + _roi("-17.5", "1.2.3.3", _square(10, 20, 13, 24)))
    read = parse_lidc_xml(f'<LidcReadMessage xmlns="{NS}"><ResponseHeader><SeriesInstanceUid>1.2.3'
                          f'</SeriesInstanceUid></ResponseHeader><readingSession><servicingRadiologistID>7'
                          f'</servicingRadiologistID><unblindedReadNodule><noduleID>n</noduleID>{rois}'
                          f'</unblindedReadNodule></readingSession></LidcReadMessage>')
    (mark,) = read.sessions[0].marks
    assert [r.z for r in mark.rois] == [-12.5, -17.5]
    assert read.problems == ["reading session 1, unblindedreadnodule 'n': roi 2: roi without edgeMap points; "
                             "that slice's outline left out"]


def _one_nodule(reader: str, points, chars: str = "") -> str:
    return (f"<readingSession><servicingRadiologistID>{reader}</servicingRadiologistID><unblindedReadNodule>"
            f"<noduleID>n</noduleID>{chars}{_roi('-12.5', '1.2.3.1', points)}</unblindedReadNodule></readingSession>")


def _message(*sessions: str) -> str:
    return (f'<LidcReadMessage xmlns="{NS}"><ResponseHeader><SeriesInstanceUid>1.2.3</SeriesInstanceUid>'
            f'</ResponseHeader>{"".join(sessions)}</LidcReadMessage>')


def test_an_outline_off_the_image_is_left_out_and_reported():
    """Points further than a pixel outside the 64x64 image (negative, past the edge, 1e300)
    would make boxes that no cell of the slice holds: that roi is left out, the problem named;
    an outline running one pixel past the border is held to the image."""
    read = parse_lidc_xml(_message(_one_nodule("a", _square(10, 10, 14, 14)), _one_nodule("b", _square(-5, 10, 3, 14)),
                                   _one_nodule("c", _square(60, 10, 66, 14)), _one_nodule("d", [(1e300, 3), (4, 5)]),
                                   _one_nodule("e", _square(60, -1, 64, 4))))
    rows, problems = lidc_rows(read, _slices(), "x.xml")
    assert [r["reader"] for r in rows] == ["a", "e"]
    assert (rows[1]["row0"], rows[1]["col0"], rows[1]["row1"], rows[1]["col1"]) == (0, 60, 4, 63)
    assert [p.split(":")[0] for p in problems] == ["reader b, nodule 'n'", "reader c, nodule 'n'",
                                                   "reader d, nodule 'n'"]
    assert "has the point x=-5, y=10 outside the 64x64 image; left out" in problems[0]
    assert "x=66, y=10 outside" in problems[1] and "x=1e+300, y=3 outside" in problems[2]


def test_ratings_off_the_lidc_scales_are_left_out_and_reported():
    chars = ("<characteristics><subtlety></subtlety><sphericity>-3</sphericity><texture>99</texture>"
             "<malignancy>high</malignancy><margin>3.5</margin><lobulation>2</lobulation></characteristics>")
    read = parse_lidc_xml(_message(_one_nodule("a", _square(10, 10, 14, 14), chars)))
    (mark,) = read.sessions[0].marks
    assert mark.characteristics == {"lobulation": 2}     # the empty subtlety silently, as LIDC has them
    assert read.problems == [
        "reading session 1, unblindedreadnodule 'n': sphericity '-3' is not a rating 1-5; left out",
        "reading session 1, unblindedreadnodule 'n': texture '99' is not a rating 1-5; left out",
        "reading session 1, unblindedreadnodule 'n': malignancy 'high' is not a rating 1-5; left out",
        "reading session 1, unblindedreadnodule 'n': margin '3.5' is not a rating 1-5; left out"]


def test_a_session_repeated_mark_for_mark_counts_once():
    """A copied session would count as a second reader towards the consensus; readers who
    only clicked the same pixel (a small nodule: no outline, no vote) are not copies."""
    same = _one_nodule("a", _square(10, 10, 14, 14))
    click = _one_nodule("d", [(30, 30)])
    read = parse_lidc_xml(_message(same, _one_nodule("b", _square(11, 11, 14, 14)), same.replace(">a<", ">c<"),
                                   click, click.replace(">d<", ">e<")))
    assert [s.reader for s in read.sessions] == ["a", "b", "d", "e"]
    assert read.problems == ["reading session 3 repeats session 1 mark for mark; counted once"]

def test_rows_one_per_reader_per_slice_by_sop_then_z():
    rows, problems = lidc_rows(parse_lidc_xml(HAND_XML), _slices(), "hand.xml")
    got = {(r["reader"], r["kind"], r["slice_index"]): r for r in rows}
    assert set(got) == {("111", "nodule", 1), ("111", "nodule", 2), ("222", "nodule", 1), ("222", "nodule", 2),
                        ("333", "small_nodule", 0), ("333", "non_nodule", 3)}
    a = got[("111", "nodule", 1)]
    assert (a["row0"], a["col0"], a["row1"], a["col1"]) == (20, 10, 25, 14)
    assert (a["center_row"], a["center_col"]) == ("22.5", "12")
    assert a["sop_uid"] == "1.2.3.1" and a["z_mm"] == "-12.5" and a["malignancy"] == 4
    # the hole (inclusion FALSE) on slice 2 does not change the box
    b = got[("111", "nodule", 2)]
    assert (b["row0"], b["col0"], b["row1"], b["col1"]) == (21, 11, 24, 13)
    # reader 222 had no SOP UIDs: z within half the spacing finds the slices
    assert got[("222", "nodule", 2)]["sop_uid"] == "1.2.3.2"
    # diameter: largest distance between outline points on one slice, less a pixel
    assert float(a["diameter_mm"]) == pytest.approx(math.hypot(4, 5) * 0.7 - 0.7, abs=1e-4)
    assert a["diameter_mm"] == b["diameter_mm"]
    small = got[("333", "small_nodule", 0)]
    assert (small["row0"], small["col0"], small["row1"], small["col1"]) == (41, 40, 41, 40)
    assert small["diameter_mm"] == "" and small["malignancy"] == ""
    assert all(set(r) == set(NODULE_COLUMNS) for r in rows)
    # the roi at z = -400 matches no slice: reported with the bad nodule, not fatal
    assert len(problems) == 2
    assert any("z=-400.0" in p and "111" in p and "matches no prepared slice" in p for p in problems)


def test_z_fallback_stops_at_half_the_spacing():
    s = _slices()
    assert s.locate("unknown", -12.5 - 1.24) == 1
    assert s.locate("unknown", -12.5 - 1.3) == 2
    assert s.locate("", -10.0 + 1.3) is None
    assert s.locate("1.2.3.3", 1000.0) == 3          # the SOP UID wins over z
    # an uneven step: half the median spacing (2.5) would reach from 5.0 to the slice at 6.25
    uneven = SeriesSlices(series_id="S", patient_id="P", series_uid="1.2.3", sop_uids=["a", "b", "c", "d"],
                          z=[0.0, 2.5, 6.25, 7.5], spacing_z=2.5, spacing_yx=(0.7, 0.7), shape_yx=(64, 64))
    assert uneven.locate("", 5.0) is None and uneven.locate("", 6.0) == 2 and uneven.locate("", 3.0) == 1


def test_a_mark_on_a_slice_prep_left_out_stays_off_its_neighbours():
    """The slice at -15 could not be read: a mark naming it (by SOP UID, or by a z nearer it
    than any slice kept) is left out and named, not moved to the slice beside it."""
    s = SeriesSlices(series_id="S", patient_id="P", series_uid="1.2.3", sop_uids=["1.2.3.0", "1.2.3.1", "1.2.3.3"],
                     z=[-10.0, -12.5, -17.5], spacing_z=2.5, spacing_yx=(0.7, 0.7), shape_yx=(64, 64),
                     dropped_sops=frozenset({"1.2.3.2"}), dropped_z=(-15.0,))
    assert s.names_dropped("1.2.3.2", -15.0) and s.names_dropped("", -14.2)
    assert not s.names_dropped("", -13.5) and not s.names_dropped("1.2.3.1", -15.0)
    xml = _message(_one_nodule("a", _square(10, 20, 14, 25)).replace("1.2.3.1", "1.2.3.2").replace("-12.5", "-15.0"))
    rows, problems = lidc_rows(parse_lidc_xml(xml), s, "x.xml")
    assert rows == [] and problems == ["reader a, nodule 'n': roi at z=-15.0 (SOP 1.2.3.2) is on a slice prep left "
                                       "out (its pixel data could not be read); left out"]


@pytest.mark.parametrize("text, why", [
    (HAND_XML[:-200], "malformed XML"),
    ("<IdriReadMessage xmlns='http://www.nih.gov'/>", "not LidcReadMessage"),
    ("not xml at all", "malformed XML"),
    ('<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">]><LidcReadMessage>&a;</LidcReadMessage>', "DTD"),
    ('<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE r SYSTEM "file:///etc/passwd"><LidcReadMessage/>'
     .encode("utf-16"), "not UTF-8"),
])
def test_unusable_files_raise_annotation_error(text, why):
    with pytest.raises(AnnotationError, match=why):
        parse_lidc_xml(text)


def test_reader_names_for_empty_or_repeated_ids():
    xml = (f"<LidcReadMessage xmlns='{NS}'><readingSession><servicingRadiologistID>7</servicingRadiologistID>"
           "</readingSession><readingSession><servicingRadiologistID>7</servicingRadiologistID></readingSession>"
           "<readingSession/><readingSession><servicingRadiologistID>9</servicingRadiologistID></readingSession>"
           "</LidcReadMessage>")
    assert reader_names(parse_lidc_xml(xml)) == ["session1", "session2", "session3", "9"]


def test_xml_round_trip():
    read = parse_lidc_xml(HAND_XML)
    again = parse_lidc_xml(to_lidc_xml(read.sessions, read.series_uid, read.study_uid))
    assert again.series_uid == "1.2.3" and again.problems == []
    assert [s.reader for s in again.sessions] == [s.reader for s in read.sessions]
    assert [s.marks for s in again.sessions] == [s.marks for s in read.sessions]
    # without a namespace prefix the parser still reads it
    plain = to_lidc_xml(read.sessions, "1.2.3").replace(f' xmlns="{NS}"', "")
    assert [s.marks for s in parse_lidc_xml(plain).sessions] == [s.marks for s in read.sessions]


def _row(reader, k, box, kind="nodule", source="lidc-xml", series="S", nodule="n"):
    r0, c0, r1, c1 = box
    return {"series_id": series, "slice_index": k, "reader": reader, "nodule_id": nodule, "kind": kind,
            "source": source, "row0": r0, "col0": c0, "row1": r1, "col1": c1}


def test_consensus_needs_min_readers_on_the_same_slice():
    rows = [
        _row("a", 5, (10, 10, 20, 20)), _row("b", 5, (12, 14, 22, 24)), _row("c", 5, (15, 5, 18, 16)),
        _row("d", 5, (40, 40, 44, 44)),                                  # alone, elsewhere on the slice
        _row("a", 6, (10, 10, 20, 20)),                                  # one reader only
        _row("truth", 6, (10, 10, 20, 20), source="synth"),              # the ground truth never votes
        _row("b", 6, (11, 11, 19, 19), kind="small_nodule"),             # left out by default
        # three readers, three lesions whose boxes touch at a corner pixel only: no two agree
        _row("a", 7, (0, 0, 3, 3)), _row("b", 7, (3, 3, 6, 6)), _row("c", 7, (6, 6, 9, 9)),
    ]
    two = consensus(rows)
    assert [(c["slice_index"], c["readers"]) for c in two] == [(5, ["a", "b", "c"])]
    # pixels inside at least two readers' boxes on slice 5: a & b, a & c
    assert (two[0]["row0"], two[0]["col0"], two[0]["row1"], two[0]["col1"]) == (12, 10, 20, 20)
    assert two[0]["center_row"] == 16.0 and two[0]["marks"] == ["a:n", "b:n", "c:n"]
    three = consensus(rows, min_readers=3)
    assert [(c["slice_index"], c["row0"], c["col0"], c["row1"], c["col1"]) for c in three] == [(5, 15, 14, 18, 16)]
    with_small = consensus(rows, kinds=("nodule", "small_nodule"))
    assert [c["slice_index"] for c in with_small] == [5, 6]
    assert [c["slice_index"] for c in consensus(rows, min_readers=1)] == [5, 5, 6, 7, 7, 7]
    # one reader's outline round two nodules that another outlined apart: two regions, none
    # over the lung between them
    pair = [_row("a", 2, (10, 10, 20, 50)), _row("b", 2, (12, 12, 18, 18)), _row("b", 2, (12, 42, 18, 48), nodule="m")]
    assert [(c["col0"], c["col1"], c["readers"]) for c in consensus(pair)] == [(12, 18, ["a", "b"]),
                                                                                (42, 48, ["a", "b"])]
    # two nodules, each outlined by both readers, boxes touching at a corner: two regions
    corner = [_row(r, 3, box, nodule=n) for r in ("a", "b") for n, box in (("n", (15, 15, 24, 24)),
                                                                            ("m", (24, 24, 34, 34)))]
    assert [(c["row0"], c["row1"], c["marks"]) for c in consensus(corner)] == [(15, 24, ["a:n", "b:n"]),
                                                                                (24, 34, ["a:m", "b:m"])]
    # the same reader twice is one vote; table rows come as strings
    same = [_row("a", 1, (0, 0, 4, 4)), _row("a", 1, (2, 2, 5, 5), nodule="m")]
    assert consensus([{k: str(v) for k, v in r.items()} for r in same]) == []


# --- synth -> prep -> _labels/nodules.csv ------------------------------------------------------

@pytest.fixture(scope="module")
def synth_prep(tmp_path_factory):
    base = tmp_path_factory.mktemp("annot")
    labels = generate_dataset(base / "dicom", patients=2, slices=8, size=64, seed=2)
    report = ingest.prepare([base / "dicom"], base / "processed", workers=1, progress=False)
    return base, labels, report


def _xml_counts(path: Path) -> Counter:
    """(reader, nodule id) -> number of roi elements, and (reader, 'non') -> nonNodules,
    counted with ElementTree alone."""
    counts: Counter = Counter()
    for session in ET.parse(path).getroot().iter(f"{{{NS}}}readingSession"):
        reader = session.findtext(f"{{{NS}}}servicingRadiologistID")
        for nod in session.iter(f"{{{NS}}}unblindedReadNodule"):
            counts[(reader, nod.findtext(f"{{{NS}}}noduleID"))] += len(nod.findall(f"{{{NS}}}roi"))
        counts[(reader, "non")] += len(session.findall(f"{{{NS}}}nonNodule"))
    return counts


def test_synth_prep_table_matches_labels(synth_prep):
    base, labels, report = synth_prep
    ann = report["annotations"]
    assert ann["table"] == NODULES_TABLE and ann["problems"] == []
    assert len(ann["files"]) == 3                      # two annotations.xml and labels.json
    assert report["files_skipped"] == []               # used annotation files are not "skipped"
    on_disk = json.loads((base / "processed" / "prep_report.json").read_text())
    assert on_disk["annotations"]["rows"] == ann["rows"]
    rows = read_table(base / "processed" / NODULES_TABLE)
    assert len(rows) == ann["rows"]
    keys = [(r["series_id"], r["source"], r["reader"], r["nodule_id"], r["slice_index"]) for r in rows]
    assert len(keys) == len(set(keys))                 # one row per reader per mark per slice
    for series in labels["series"]:          # one series per patient
        mine = [r for r in rows if r["patient_id"] == series["patient_id"]]
        assert len({r["series_id"] for r in mine}) == 1
        dz = series["spacing_zyx_mm"][0]
        for j, n in enumerate(series["nodules"]):
            truth = [r for r in mine if r["source"] == "synth" and r["nodule_id"] == f"Nodule {j + 1:03d}"]
            cz, cy, cx = n["center_zyx_vox"]
            want = [k for k in range(series["num_slices"]) if abs(k - cz) * dz < n["radius_mm"]]
            assert sorted(int(r["slice_index"]) for r in truth) == want
            for r in truth:
                # pixel j covers [j - 0.5, j + 0.5] in voxel-index coordinates
                assert int(r["row0"]) - 0.5 <= cy <= int(r["row1"]) + 0.5
                assert int(r["col0"]) - 0.5 <= cx <= int(r["col1"]) + 0.5
                assert float(r["diameter_mm"]) == pytest.approx(2 * n["radius_mm"])
                assert r["texture"] == {"solid": "5", "part_solid": "3", "ground_glass": "1"}[n["type"]]
            # each reader's outline of nodule j surrounds its centre, on slices near the truth's
            for r in (r for r in mine if r["source"] == "lidc-xml" and r["nodule_id"] == f"Nodule {j + 1:03d}"):
                assert int(r["row0"]) - 1 <= cy <= int(r["row1"]) + 1 and int(r["col0"]) - 1 <= cx <= int(r["col1"]) + 1
                assert abs(int(r["slice_index"]) - cz) * dz < n["radius_mm"] * 1.5 + 0.5 * dz
        # rows of the readers = roi elements of the series' XML
        counts = _xml_counts(base / "dicom" / series["annotation_xml"])
        assert len({reader for reader, _ in counts}) == 4
        for (reader, what), n_xml in counts.items():
            if what == "non":
                got = [r for r in mine if r["reader"] == reader and r["kind"] == "non_nodule"]
            else:
                got = [r for r in mine if r["reader"] == reader and r["nodule_id"] == what]
            assert len(got) == n_xml, (reader, what)
    assert {r["kind"] for r in rows} >= {"nodule", "non_nodule"}


def test_synth_readers_disagree_and_consensus_decides(synth_prep):
    base, labels, _ = synth_prep
    rows = read_table(base / "processed" / NODULES_TABLE)
    marks = [r for r in rows if r["source"] == "lidc-xml" and r["kind"] != "non_nodule"]
    per_nodule = Counter((r["series_id"], r["nodule_id"]) for r in {(r["series_id"], r["nodule_id"], r["reader"]): r
                                                                    for r in marks}.values())
    assert min(per_nodule.values()) == 1 and max(per_nodule.values()) == 4   # seed 2: readers disagree
    readers_on = defaultdict(set)
    for r in marks:
        readers_on[(r["series_id"], int(r["slice_index"]))].add(r["reader"])
    by_min = {m: {(c["series_id"], c["slice_index"]) for c in consensus(rows, min_readers=m)} for m in (1, 2, 3, 4)}
    assert by_min[1] == set(readers_on)
    for m in (2, 3, 4):
        assert by_min[m] <= {key for key, who in readers_on.items() if len(who) >= m}
    assert by_min[4] < by_min[3] < by_min[2] < by_min[1]
    patient = {r["series_id"]: r["patient_id"] for r in rows}
    series = {s["patient_id"]: s for s in labels["series"]}
    for c in consensus(rows):     # every agreed region holds a nodule of labels.json, give or take a slice
        s = series[patient[c["series_id"]]]
        assert any(c["row0"] - 1 <= y <= c["row1"] + 1 and c["col0"] - 1 <= x <= c["col1"] + 1
                   and abs(c["slice_index"] - z) <= n["radius_mm"] / s["spacing_zyx_mm"][0] + 1
                   for n in s["nodules"] for z, y, x in [n["center_zyx_vox"]])


def test_bad_annotation_files_are_reported_not_fatal(synth_prep, tmp_path):
    base, labels, _ = synth_prep
    dicom = tmp_path / "dicom"
    shutil.copytree(base / "dicom", dicom)
    s0, s1 = labels["series"]
    sops = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            for f in sorted((dicom / s0["series_dir"]).glob("slice_*.dcm"))]
    session = (f"<readingSession><servicingRadiologistID>x</servicingRadiologistID>"
               f"<nonNodule><nonNoduleID>N1</nonNoduleID><imageZposition>1</imageZposition>"
               f"<imageSOP_UID>{sops[3]}</imageSOP_UID><locus><xCoord>5</xCoord><yCoord>6</yCoord></locus></nonNodule>"
               f"<nonNodule><nonNoduleID>N2</nonNoduleID><imageZposition>-9999</imageZposition>"
               f"<imageSOP_UID/><locus><xCoord>5</xCoord><yCoord>6</yCoord></locus></nonNodule>"
               f"</readingSession>")
    (own,) = (dicom / s0["series_dir"]).glob("*.xml")
    extra = own.read_text().replace("</LidcReadMessage>", session + "</LidcReadMessage>")
    own.unlink()
    # in the patient folder, above the series folder: found by the walk up to the input root
    (dicom / s0["patient_id"] / "069.xml").write_text(extra)
    (dicom / s1["series_dir"] / "broken.xml").write_text(HAND_XML[:300])
    report = ingest.prepare([dicom], tmp_path / "processed", workers=1, progress=False)
    assert report["counts"]["series_written"] == 2     # the prep went on as usual
    problems = report["annotations"]["problems"]
    assert any(Path(p["file"]).name == "broken.xml" and p["problem"].startswith("malformed XML") for p in problems)
    assert any(Path(p["file"]).name == "069.xml" and "z=-9999.0" in p["problem"] for p in problems)
    assert len(problems) == 2
    assert not report["files_skipped"]    # listed once, under the annotations' problems, not also as "not DICOM"
    rows = read_table(tmp_path / "processed" / NODULES_TABLE)
    hit = [r for r in rows if r["reader"] == "x"]
    assert len(hit) == 1 and hit[0]["nodule_id"] == "N1" and hit[0]["slice_index"] == "3"
    assert hit[0]["kind"] == "non_nodule" and (hit[0]["row0"], hit[0]["col0"]) == ("6", "5")
    # the synthetic readers' rows are all still there
    before = read_table(base / "processed" / NODULES_TABLE)
    assert len(rows) == len(before) + 1



def test_the_xml_of_another_series_beside_a_series_is_not_tied_to_it(synth_prep, tmp_path):
    """One folder that held two series' files and XML (a flattened download, a merged
    export), where one series is gone or skipped: its XML, beside the other series alone,
    was matched to it by folder and its marks tied by z to that scan, another patient's
    nodules in the table. An XML whose marks name none of the series' images is left out."""
    base, labels, _ = synth_prep
    dicom = tmp_path / "dicom"
    shutil.copytree(base / "dicom", dicom)
    s0, s1 = labels["series"]
    (theirs,) = (dicom / s1["series_dir"]).glob("*.xml")
    theirs.rename(dicom / s0["series_dir"] / "other.xml")
    shutil.rmtree(dicom / s1["series_dir"])
    report = ingest.prepare([dicom], tmp_path / "processed", workers=1, progress=False)
    (problem,) = report["annotations"]["problems"]
    assert Path(problem["file"]).name == "other.xml" and "series_id" not in problem
    assert problem["problem"].startswith(f"belongs to no prepared series (SeriesInstanceUid {s1['series_uid']}, and "
                                         f"none of the ") and "is a slice of the series beside it" in problem["problem"]
    rows = read_table(tmp_path / "processed" / NODULES_TABLE)
    assert {r["file"] for r in rows if r["source"] == "lidc-xml"} == {str(next((dicom / s0["series_dir"]).glob(
        "annotations.xml")))}
    assert {r["patient_id"] for r in rows} == {s0["patient_id"]}


def test_an_xml_beside_no_prepared_series_is_named_as_such(synth_prep, tmp_path):
    """LIDC-IDRI holds reads of radiographs (CR/DX series, skipped as not CT) beside them:
    their XML was counted among the files 'not a DICOM file', as if something were wrong
    with the archive's images."""
    base, labels, _ = synth_prep
    dicom = tmp_path / "dicom"
    shutil.copytree(base / "dicom", dicom)
    (original,) = (dicom / labels["series"][0]["series_dir"]).glob("*.xml")
    (dicom / "radiograph").mkdir()
    shutil.copy(original, dicom / "radiograph" / "069.xml")
    report = ingest.prepare([dicom], tmp_path / "processed", workers=1, progress=False)
    assert report["files_skipped"] == [{"path": str(dicom / "radiograph" / "069.xml"), "reason": (
        "XML beside no prepared CT series (LIDC reads are taken from the folder of the series they annotate, or "
        "a folder above it)")}]
    assert "skipped files: 1 XML beside no prepared CT series" in ingest.format_summary(report)


def test_a_copy_of_a_series_annotation_file_is_read_once(synth_prep, tmp_path):
    """The same XML found twice for one series (copied into another folder) would count each
    of its readers twice: the copy is left out and named."""
    base, labels, _ = synth_prep
    dicom = tmp_path / "dicom"
    shutil.copytree(base / "dicom", dicom)
    s0, s1 = labels["series"]
    (original,) = (dicom / s0["series_dir"]).glob("*.xml")
    shutil.copy(original, dicom / s1["series_dir"] / "copy.xml")
    report = ingest.prepare([dicom], tmp_path / "processed", workers=1, progress=False)
    (problem,) = report["annotations"]["problems"]
    assert Path(problem["file"]).name == "copy.xml" and problem["problem"].startswith(
        f"the same content as {original}") and problem["problem"].endswith("read already for this series; left out")
    assert len(read_table(tmp_path / "processed" / NODULES_TABLE)) == len(read_table(base / "processed" / NODULES_TABLE))

def test_a_copy_saved_again_with_other_line_ends_is_read_once(synth_prep, tmp_path):
    """A re-downloaded annotation pack beside the first: the same reads in other bytes."""
    base, labels, _ = synth_prep
    dicom = tmp_path / "dicom"
    shutil.copytree(base / "dicom", dicom)
    (original,) = (dicom / labels["series"][0]["series_dir"]).glob("*.xml")
    (original.parent / "again.xml").write_bytes(original.read_bytes().replace(b"\n", b"\r\n  "))
    report = ingest.prepare([dicom], tmp_path / "processed", workers=1, progress=False)
    (problem,) = report["annotations"]["problems"]
    assert Path(problem["file"]).name in ("again.xml", original.name)
    assert problem["problem"].endswith("read already for this series; left out")
    before = read_table(base / "processed" / NODULES_TABLE)
    assert len(read_table(tmp_path / "processed" / NODULES_TABLE)) == len(before)


def test_a_second_xml_file_for_a_series_is_left_out_not_pooled(synth_prep, tmp_path):
    """LIDC-IDRI has a resubmitted read beside its first (pylidc: 161.xml). Reader names are a
    file's own, so pooling both counted one reader's nodule as a 2-reader consensus."""
    base, labels, _ = synth_prep
    dicom = tmp_path / "dicom"
    shutil.copytree(base / "dicom", dicom)
    (original,) = (dicom / labels["series"][0]["series_dir"]).glob("*.xml")
    text = original.read_text()
    first = text.index("<readingSession")   # the resubmission: the sessions in another order
    second = text.index("<readingSession", first + 1)
    resubmitted = text[:first] + text[second:text.rindex("</readingSession>") + len("</readingSession>")] \
        + text[first:second] + text[text.rindex("</readingSession>") + len("</readingSession>"):]
    assert resubmitted != text and len(resubmitted) == len(text)
    (original.parent / "zz-resubmitted.xml").write_text(resubmitted)
    (dicom / labels["series"][0]["patient_id"] / "0.xml").write_text(resubmitted)   # above: found, not preferred
    report = ingest.prepare([dicom], tmp_path / "processed", workers=1, progress=False)
    problems = report["annotations"]["problems"]
    assert sorted(Path(p["file"]).name for p in problems) == ["0.xml", "zz-resubmitted.xml"]
    assert all(p["problem"].startswith(f"a second LIDC XML file for this series ({original} read already)")
               for p in problems)
    before = read_table(base / "processed" / NODULES_TABLE)
    assert len(read_table(tmp_path / "processed" / NODULES_TABLE)) == len(before)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")   # the NaN is the point
def test_a_rerun_keeps_the_rows_of_a_series_with_an_unreadable_slice(synth_prep, tmp_path, monkeypatch):
    """The first prep drops a slice whose pixel data it cannot read. A plain re-run must not
    keep the volume blind to that (its marks would no longer tie to slices) nor lose the
    series' rows: it reads that series again and writes the same table."""
    base, labels, _ = synth_prep
    dicom, root = tmp_path / "dicom", tmp_path / "processed"
    shutil.copytree(base / "dicom", dicom)
    s0 = labels["series"][0]
    bad = sorted((dicom / s0["series_dir"]).glob("slice_*.dcm"))[5]
    ds = pydicom.dcmread(bad)
    ds.RescaleSlope = "NaN"
    ds.save_as(bad)
    first = ingest.prepare([dicom], root, workers=1, progress=False)
    table = read_table(root / NODULES_TABLE)
    sid = next(r["series_id"] for r in table if r["patient_id"] == s0["patient_id"])
    assert [Path(f["path"]).name for f in first["files_skipped"]] == [bad.name]
    again = ingest.prepare([dicom], root, workers=1, progress=False)
    assert again["series_written"] == [sid] and len(again["series_kept"]) == 1
    assert read_table(root / NODULES_TABLE) == table
    assert again["annotations"]["problems"] == first["annotations"]["problems"]   # the marks on that slice
    # and where a volume is kept whose slices cannot be tied, its earlier rows stay
    monkeypatch.setattr(ingest, "_volume_matches", lambda root, row, task: True)
    kept = ingest.prepare([dicom], root, workers=1, progress=False)
    assert kept["series_written"] == [] and read_table(root / NODULES_TABLE) == table
    untied = [p for p in kept["annotations"]["problems"] if p["problem"].startswith("volume has")]
    assert untied and {p["series_id"] for p in untied} == {sid}
    assert all(p["problem"].endswith("(its rows from earlier runs, if any, are kept)") for p in untied)
    said = ingest.format_summary(kept)
    assert f"nodule table: {len(table)} rows of 2 series; {len(kept['annotations']['problems'])} problems with " \
           f"annotation files (listed in the report)" in said


def test_a_rerun_reads_no_unchanged_header_or_xml_and_writes_the_same_table(synth_prep, tmp_path, monkeypatch):
    """The nodule table ties marks to slices by SOP UID and z, which the header scan reads, once
    per file (it used to read each header a second time). A re-run read every header and parsed
    every XML file again: on LIDC-IDRI ~250 k headers (~6 min of one core) and ~1,000 XML
    files (tens of seconds). Both are now cached in the root by path, size and modification
    time: a re-run reads only the files changed since, --force reads all, and every run writes
    the same table and report."""
    import pydicom

    from dinox.data import annotations
    base, _, _ = synth_prep
    dicom, root = tmp_path / "dicom", tmp_path / "processed"
    shutil.copytree(base / "dicom", dicom)
    first = ingest.prepare([dicom], root, workers=1, progress=False)
    table = read_table(root / NODULES_TABLE)
    real_read, real_parse, reads, parsed = pydicom.dcmread, annotations.parse_lidc_xml, Counter(), []

    def counting(fp, *args, **kwargs):
        reads[Path(fp)] += 1
        return real_read(fp, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    monkeypatch.setattr(annotations, "parse_lidc_xml", lambda raw: parsed.append(1) or real_parse(raw))

    def rerun(**kw):
        reads.clear()
        parsed.clear()
        report = ingest.prepare([dicom], root, workers=1, progress=False, **kw)
        assert read_table(root / NODULES_TABLE) == table
        assert report["annotations"] == first["annotations"] and report["files_skipped"] == first["files_skipped"]
        return report

    assert rerun()["series_kept"] and reads == Counter() and parsed == []
    xml = sorted(dicom.glob("*/*/*.xml"))[0]
    touched = sorted(xml.parent.glob("slice_*.dcm"))[3]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    os.utime(xml, ns=(xml.stat().st_atime_ns, xml.stat().st_mtime_ns + 10**9))
    rerun()
    assert reads == Counter({touched: 1}) and len(parsed) == 1   # only what changed
    rerun()
    assert reads == Counter() and parsed == []
    forced = rerun(force=True)
    n_files = len(list(dicom.glob("*/*/slice_*.dcm")))
    assert len(forced["series_written"]) == 2 and len(parsed) == 2
    assert set(reads.values()) == {2} and len(reads) == n_files   # its header, then its pixels


def test_the_header_cache_never_keeps_a_file_it_could_not_read_now(synth_prep, tmp_path, monkeypatch):
    """A file prep could not read (no permission, a disk error) may be readable on the next
    run; its answer is not cached, where a file that is no DICOM image is."""
    from dinox.data import dicom_io
    base, _, _ = synth_prep
    dicom, root = tmp_path / "dicom", tmp_path / "processed"
    shutil.copytree(base / "dicom", dicom)
    (dicom / "notes.txt").write_text("not an image")
    victim = sorted(dicom.glob("*/*/slice_*.dcm"))[2]
    real = dicom_io.read_headers
    monkeypatch.setattr(dicom_io, "read_headers", lambda path: dicom_io.Unreadable("not readable (Input/output "
                        "error)") if Path(path) == victim else real(path))
    first = ingest.prepare([dicom], root, workers=1, progress=False)
    assert [(Path(f["path"]).name, f["reason"]) for f in first["files_skipped"]] == \
        [("notes.txt", "not a DICOM file"), (victim.name, "not readable (Input/output error)")]
    asked = []
    monkeypatch.setattr(dicom_io, "read_headers", lambda path: asked.append(Path(path)) or real(path))
    again = ingest.prepare([dicom], root, workers=1, progress=False)
    assert asked == [victim] and [Path(f["path"]).name for f in again["files_skipped"]] == ["notes.txt"]


def test_prep_without_annotations_writes_no_table(tmp_path):
    generate_dataset(tmp_path / "dicom", patients=1, slices=4, size=32, seed=1)
    for f in tmp_path.glob("dicom/**/*.xml"):
        f.unlink()
    (tmp_path / "dicom" / "labels.json").unlink()
    report = ingest.prepare([tmp_path / "dicom"], tmp_path / "processed", workers=1, progress=False)
    assert report["annotations"] == {"table": None, "files": [], "rows": 0, "series": 0, "problems": []}
    assert not (tmp_path / "processed" / NODULES_TABLE).exists()


def test_rows_of_series_from_earlier_runs_are_kept(synth_prep, tmp_path):
    base, _, _ = synth_prep
    root = tmp_path / "processed"
    shutil.copytree(base / "processed", root)
    before = read_table(root / NODULES_TABLE)
    generate_dataset(tmp_path / "more", patients=1, slices=8, size=64, seed=3)
    report = ingest.prepare([tmp_path / "more"], root, workers=1, progress=False)
    assert report["index"]["series"] == 3
    rows = read_table(root / NODULES_TABLE)
    new = [r for r in rows if r["patient_id"] == "SYNTH3-0000"]
    assert new and report["annotations"]["rows"] == len(rows) == len(before) + len(new)
    assert [r for r in rows if r["patient_id"] != "SYNTH3-0000"] == before


def test_a_damaged_row_of_an_earlier_table_is_left_out_the_rest_kept(synth_prep, tmp_path):
    base, _, _ = synth_prep
    root = tmp_path / "processed"
    shutil.copytree(base / "processed", root)
    before = read_table(root / NODULES_TABLE)
    lines = (root / NODULES_TABLE).read_text().splitlines(keepends=True)
    lines[1] = lines[1][:lines[1].index(",")] + ",cut short\n"            # the first row, damaged
    (root / NODULES_TABLE).write_text("".join(lines))
    generate_dataset(tmp_path / "more", patients=1, slices=8, size=64, seed=3)
    report = ingest.prepare([tmp_path / "more"], root, workers=1, progress=False)
    problems = [p for p in report["annotations"]["problems"] if "earlier table: line 2" in str(p)]
    assert len(problems) == 1
    kept = [r for r in read_table(root / NODULES_TABLE) if r["patient_id"] != "SYNTH3-0000"]
    assert kept == before[1:]


@pytest.mark.parametrize("damage, said", [
    (lambda text: text[:text.rindex(",Nodule")], "line 3 has fewer fields"),      # cut short mid-row
    (lambda text: text.replace(",7,1.5,", ",x,1.5,", 1), "line 2: slice_index 'x' is not a number"),
    (lambda text: text.replace(",5", ",nan", 1), "line 2: texture 'nan' is not a number"),   # prep writes "" for none
])
def test_a_damaged_label_table_is_refused_naming_the_line(tmp_path, damage, said):
    from dinox.data.annotations import write_table
    from dinox.errors import UserError
    from dinox.eval import probe

    row = {c: "" for c in NODULE_COLUMNS}
    row.update(series_id="1.2.3", patient_id="P1", source="lidc-xml", reader="r1", kind="nodule",
               nodule_id="Nodule 001", slice_index=7, z_mm=1.5, row0=1, col0=2, row1=3, col1=4, texture=5)
    path = tmp_path / NODULES_TABLE
    path.parent.mkdir(parents=True)
    write_table(path, [row, {**row, "reader": "r2"}])
    assert len(read_table(path)) == 2
    path.write_text(damage(path.read_text()))
    with pytest.raises(ValueError, match=said):
        read_table(path)
    with pytest.raises(UserError, match="unreadable label table"):   # not a traceback in `dinox eval probe`
        probe.load_labels(tmp_path)
