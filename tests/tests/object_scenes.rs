//! The detection and segmentation scenes (kiln_data::ObjectScenes): seeded, exact boxes, masks and semantic
//! maps that agree with each other, objects from both sources at the scales asked, overlaps and cut borders.

use kiln_data::{Dataset, ObjectSceneConfig, ObjectScenes, ObjectSource, ObjectSplit};
use kiln_tests::test_rng;

#[test]
fn scenes_are_seeded_and_their_boxes_masks_and_maps_agree() {
    let seed = test_rng("object_scenes").next_u64();
    let cfg = ObjectSceneConfig::default();
    let train = ObjectScenes::new(cfg, ObjectSplit::Train, seed, 200, None).expect("MNIST-10k shipped, Fashion-MNIST installed by scripts/setup");
    let test = ObjectScenes::new(cfg, ObjectSplit::Test, seed, 200, None).unwrap();
    assert_eq!(train.scene(5).unwrap(), ObjectScenes::new(cfg, ObjectSplit::Train, seed, 6, None).unwrap().scene(5).unwrap(), "scene i depends on (seed, split, i) only");
    assert_ne!(train.scene(5).unwrap(), test.scene(5).unwrap());
    assert!(train.scene(200).is_err());
    assert_eq!(train.classes(), 20);
    let s = cfg.size;
    let (mut classes, mut sides, mut overlaps, mut cut) = (std::collections::BTreeSet::new(), Vec::new(), 0, 0);
    for i in 0..train.len {
        let scene = train.scene(i).unwrap();
        assert_eq!(scene.image.len(), 3 * s * s);
        assert!(scene.image.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!((1..=cfg.objects.1).contains(&scene.objects.len()), "scene {i}: {} objects", scene.objects.len());
        let mut covered = vec![0u8; s * s];
        for o in &scene.objects {
            classes.insert(o.class);
            let [x1, y1, x2, y2] = o.bbox.map(|v| v as usize);
            let pts: Vec<usize> = (0..s * s).filter(|&p| o.mask[p] == 1).collect();
            // The box is the mask's tight box: every mask pixel inside, every edge touched.
            assert!(pts.iter().all(|&p| (x1..x2).contains(&(p % s)) && (y1..y2).contains(&(p / s))), "scene {i}: mask outside its box");
            assert!(pts.iter().any(|&p| p % s == x1) && pts.iter().any(|&p| p % s == x2 - 1) && pts.iter().any(|&p| p / s == y1) && pts.iter().any(|&p| p / s == y2 - 1));
            for &p in &pts {
                covered[p] += 1;
                assert_eq!(scene.semantic[p], o.class + 1, "scene {i}: the semantic map names the visible object");
            }
            sides.push((x2 - x1).max(y2 - y1));
            cut += (x1 == 0 || y1 == 0 || x2 == s || y2 == s) as usize;
        }
        assert!(covered.iter().all(|&c| c <= 1), "scene {i}: visible masks do not overlap");
        assert!((0..s * s).all(|p| (covered[p] == 1) == (scene.semantic[p] != 0)), "scene {i}: background is 0");
        for (a, p) in scene.objects.iter().enumerate() {
            overlaps += scene.objects[a + 1..].iter().filter(|q| p.bbox[0] < q.bbox[2] && q.bbox[0] < p.bbox[2] && p.bbox[1] < q.bbox[3] && q.bbox[1] < p.bbox[3]).count();
        }
    }
    assert!(classes.iter().any(|&c| c < 10) && classes.iter().any(|&c| c >= 10), "digits and Fashion-MNIST items: {classes:?}");
    assert_eq!(classes.len(), 20, "every class appears in 200 scenes");
    sides.sort();
    assert!(sides[sides.len() / 20] <= 16 && sides[sides.len() * 19 / 20] >= 40, "scales 0.5-2x of 28 pixels: {:?} .. {:?}", &sides[..5], &sides[sides.len() - 5..]);
    assert!(overlaps >= 20 && cut >= 20, "{overlaps} overlapping pairs, {cut} objects cut by the border");
    // As a data set: a Detection sample with the boxes, labels and masks.
    let d = train.get(3).unwrap();
    let scene = train.scene(3).unwrap();
    assert_eq!((d.shape, d.boxes.len(), d.masks.as_ref().unwrap().len()), ([3, s, s], scene.objects.len(), scene.objects.len()));
    assert!(ObjectScenes::new(ObjectSceneConfig { size: 16, ..cfg }, ObjectSplit::Train, 1, 1, None).is_err());
    let digits = ObjectScenes::new(ObjectSceneConfig { source: ObjectSource::Digits, ..cfg }, ObjectSplit::Test, 1, 50, None).unwrap();
    assert!((0..50).all(|i| digits.scene(i).unwrap().objects.iter().all(|o| o.class < 10)));
}
