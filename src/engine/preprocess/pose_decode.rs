//! controlnet_aux's OpenPose body decoding (the part of `Body.__call__` after the
//! network): each part's heatmap smoothed with scipy's Gaussian (σ 3, reflected borders,
//! radius 12), its local maxima above 0.1 taken as candidates; each limb's candidate
//! pairs scored by the part affinity field sampled at ten points between them (at least
//! nine above 0.05, a mean plus a distance prior above zero), the best pairs kept
//! greedily; limbs assembled into people, merging where disjoint; people with fewer than
//! four parts or a mean score below 0.4 dropped. Everything in double precision, as numpy
//! runs it.

/// Parts (18 body joints) and the heatmap channels beside them (19 with the background).
pub const PARTS: usize = 18;
const HEATMAPS: usize = 19;
/// Part affinity field channels: an (x, y) pair per limb.
const AFFINITIES: usize = 38;

/// The limbs as pairs of parts (1-based, as the reference lists them).
pub const LIMBS: [[usize; 2]; 19] = [
    [2, 3],
    [2, 6],
    [3, 4],
    [4, 5],
    [6, 7],
    [7, 8],
    [2, 9],
    [9, 10],
    [10, 11],
    [2, 12],
    [12, 13],
    [13, 14],
    [2, 1],
    [1, 15],
    [15, 17],
    [1, 16],
    [16, 18],
    [3, 17],
    [6, 18],
];
/// Each limb's affinity channels (offset by the 19 heatmaps, as the reference numbers them).
const FIELDS: [[usize; 2]; 19] = [
    [31, 32],
    [39, 40],
    [33, 34],
    [35, 36],
    [41, 42],
    [43, 44],
    [19, 20],
    [21, 22],
    [23, 24],
    [25, 26],
    [27, 28],
    [29, 30],
    [47, 48],
    [49, 50],
    [53, 54],
    [51, 52],
    [55, 56],
    [37, 38],
    [45, 46],
];
const PEAK_THRESHOLD: f64 = 0.1;
const FIELD_THRESHOLD: f64 = 0.05;
const SAMPLES: usize = 10;

/// A part candidate: where, its heatmap value, its index among all candidates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub x: f64,
    pub y: f64,
    pub score: f64,
    pub id: usize,
}

/// A person: each part's candidate index (-1 for none), the total score, the part count.
#[derive(Debug, Clone, PartialEq)]
pub struct Person {
    pub parts: [f64; PARTS],
    pub score: f64,
    pub count: f64,
}

/// Heatmaps and affinity fields at the image's size, channel-last as the reference holds
/// them: `heatmaps[(y * width + x) * 19 + c]`, `affinities[(y * width + x) * 38 + c]`.
pub struct PoseMaps<'a> {
    pub width: usize,
    pub height: usize,
    pub heatmaps: &'a [f64],
    pub affinities: &'a [f64],
}

/// numpy's pairwise summation of a float64 array: up to 128 values, eight running sums
/// combined as a tree, then the remainder in order; longer ones split in two halves (the
/// first a multiple of 8 long) summed apart.
pub(super) fn numpy_sum(values: &[f64]) -> f64 {
    if values.len() < 8 {
        return values.iter().fold(0.0, |a, v| a + v);
    }
    if values.len() > 128 {
        let half = values.len() / 2;
        let split = half - half % 8;
        return numpy_sum(&values[..split]) + numpy_sum(&values[split..]);
    }
    let whole = values.len() - values.len() % 8;
    let mut r = [0.0; 8];
    r.copy_from_slice(&values[..8]);
    for chunk in values[8..whole].chunks(8) {
        for (acc, v) in r.iter_mut().zip(chunk) {
            *acc += v;
        }
    }
    let tree = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    values[whole..].iter().fold(tree, |a, v| a + v)
}

/// scipy's `gaussian_filter(plane, 3)`: σ 3, `truncate` 4, borders reflected about the
/// edge (`mode='reflect'`), along rows first, then columns.
pub(super) fn gaussian_filter(plane: &[f64], width: usize, height: usize) -> Vec<f64> {
    const SIGMA: f64 = 3.0;
    let radius = (4.0 * SIGMA + 0.5) as i64;
    let raw: Vec<f64> = (-radius..=radius)
        .map(|x| (-0.5 / (SIGMA * SIGMA) * (x * x) as f64).exp())
        .collect();
    let sum = numpy_sum(&raw);
    let weights: Vec<f64> = raw.iter().map(|w| w / sum).collect();
    let reflect = |p: i64, n: usize| {
        let n = n as i64;
        let period = 2 * n;
        let m = p.rem_euclid(period);
        (if m < n { m } else { period - 1 - m }) as usize
    };
    let r = radius as usize;
    // scipy's symmetric correlation per pixel: the centre, then each pair of mirrored taps
    // from the outermost in; run tap by tap over whole lines, which keeps that order.
    let mut columns = vec![0.0; plane.len()];
    for (y, out) in columns.chunks_exact_mut(width).enumerate() {
        let row = |d: i64| {
            let s = reflect(y as i64 + d, height);
            &plane[s * width..(s + 1) * width]
        };
        for (o, v) in out.iter_mut().zip(row(0)) {
            *o = v * weights[r];
        }
        for j in (1..=radius).rev() {
            let w = weights[r - j as usize];
            for ((o, a), b) in out.iter_mut().zip(row(-j)).zip(row(j)) {
                *o += (a + b) * w;
            }
        }
    }
    let mut out = vec![0.0; plane.len()];
    let mut padded = vec![0.0; width + 2 * r];
    for (line, result) in columns.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        for (i, p) in padded.iter_mut().enumerate() {
            *p = line[reflect(i as i64 - radius, width)];
        }
        for (o, v) in result.iter_mut().zip(&padded[r..]) {
            *o = v * weights[r];
        }
        for j in (1..=r).rev() {
            let w = weights[r - j];
            let (left, right) = (&padded[r - j..], &padded[r + j..]);
            for ((o, a), b) in result.iter_mut().zip(left).zip(right) {
                *o += (a + b) * w;
            }
        }
    }
    out
}

/// Each part's candidates: the smoothed heatmap's maxima over its four neighbours (zero
/// beyond the borders) above the threshold, in row-major order, scored by the raw map.
fn candidates(maps: &PoseMaps) -> Vec<Vec<Candidate>> {
    let (w, h) = (maps.width, maps.height);
    let mut next = 0;
    (0..PARTS)
        .map(|part| {
            let raw: Vec<f64> = (0..w * h)
                .map(|i| maps.heatmaps[i * HEATMAPS + part])
                .collect();
            let smooth = gaussian_filter(&raw, w, h);
            let at = |x: i64, y: i64| {
                let inside = (0..w as i64).contains(&x) && (0..h as i64).contains(&y);
                if inside {
                    smooth[y as usize * w + x as usize]
                } else {
                    0.0
                }
            };
            let mut found = Vec::new();
            for y in 0..h as i64 {
                for x in 0..w as i64 {
                    let v = at(x, y);
                    let peak = v >= at(x, y - 1)
                        && v >= at(x, y + 1)
                        && v >= at(x - 1, y)
                        && v >= at(x + 1, y);
                    if peak && v > PEAK_THRESHOLD {
                        let score = raw[y as usize * w + x as usize];
                        found.push(Candidate {
                            x: x as f64,
                            y: y as f64,
                            score,
                            id: next,
                        });
                        next += 1;
                    }
                }
            }
            found
        })
        .collect()
}

/// numpy's `linspace(a, b, 10)`.
fn linspace(a: f64, b: f64) -> [f64; SAMPLES] {
    let step = (b - a) / (SAMPLES - 1) as f64;
    let mut out = [0.0; SAMPLES];
    for (i, v) in out.iter_mut().enumerate() {
        *v = a + i as f64 * step;
    }
    out[SAMPLES - 1] = b;
    out
}

/// A limb's kept connections: (candidate id A, candidate id B, score, index A, index B).
fn connect(maps: &PoseMaps, limb: usize, a: &[Candidate], b: &[Candidate]) -> Vec<[f64; 5]> {
    let field = |x: f64, y: f64, c: usize| {
        let (x, y) = (x.round_ties_even() as usize, y.round_ties_even() as usize);
        maps.affinities[(y * maps.width + x) * AFFINITIES + c]
    };
    let [fx, fy] = FIELDS[limb].map(|c| c - HEATMAPS);
    let mut scored = Vec::new();
    for (i, ca) in a.iter().enumerate() {
        for (j, cb) in b.iter().enumerate() {
            let (dx, dy) = (cb.x - ca.x, cb.y - ca.y);
            let norm = (dx * dx + dy * dy).sqrt().max(0.001);
            let (ux, uy) = (dx / norm, dy / norm);
            let (xs, ys) = (linspace(ca.x, cb.x), linspace(ca.y, cb.y));
            let samples: Vec<f64> = xs
                .iter()
                .zip(&ys)
                .map(|(&x, &y)| field(x, y, fx) * ux + field(x, y, fy) * uy)
                .collect();
            let prior = (0.5 * maps.height as f64 / norm - 1.0).min(0.0);
            let mean = samples.iter().sum::<f64>() / SAMPLES as f64 + prior;
            let above = samples.iter().filter(|&&s| s > FIELD_THRESHOLD).count();
            if above as f64 > 0.8 * SAMPLES as f64 && mean > 0.0 {
                scored.push((i, j, mean));
            }
        }
    }
    // Python's sort is stable: equal scores keep their order.
    scored.sort_by(|p, q| q.2.partial_cmp(&p.2).unwrap_or(std::cmp::Ordering::Equal));
    let mut kept: Vec<[f64; 5]> = Vec::new();
    for (i, j, score) in scored {
        let free = kept.iter().all(|c| c[3] != i as f64 && c[4] != j as f64);
        if free {
            kept.push([a[i].id as f64, b[j].id as f64, score, i as f64, j as f64]);
            if kept.len() >= a.len().min(b.len()) {
                break;
            }
        }
    }
    kept
}

/// The candidates (in id order) and the people, as `Body.__call__` returns them.
pub fn decode(maps: &PoseMaps) -> (Vec<Candidate>, Vec<Person>) {
    let found = candidates(maps);
    let all: Vec<Candidate> = found.iter().flatten().copied().collect();
    let mut people: Vec<Person> = Vec::new();
    for (limb, [pa, pb]) in LIMBS.iter().enumerate() {
        let (a, b) = (&found[pa - 1], &found[pb - 1]);
        if a.is_empty() || b.is_empty() {
            continue;
        }
        let (ia, ib) = (pa - 1, pb - 1);
        for connection in connect(maps, limb, a, b) {
            let [part_a, part_b, score, ..] = connection;
            let matching: Vec<usize> = (0..people.len())
                .filter(|&k| people[k].parts[ia] == part_a || people[k].parts[ib] == part_b)
                .take(2)
                .collect();
            let gain = |people: &mut Vec<Person>, k: usize| {
                if people[k].parts[ib] != part_b {
                    people[k].parts[ib] = part_b;
                    people[k].count += 1.0;
                    people[k].score += all[part_b as usize].score + score;
                }
            };
            match matching[..] {
                [k] => gain(&mut people, k),
                [k1, k2] => {
                    let shared = (0..PARTS)
                        .any(|p| people[k1].parts[p] >= 0.0 && people[k2].parts[p] >= 0.0);
                    if shared {
                        // As for one match, but unconditionally.
                        people[k1].parts[ib] = part_b;
                        people[k1].count += 1.0;
                        people[k1].score += all[part_b as usize].score + score;
                    } else {
                        let other = people.remove(k2);
                        let first = &mut people[k1];
                        for p in 0..PARTS {
                            first.parts[p] += other.parts[p] + 1.0;
                        }
                        first.score += other.score + score;
                        first.count += other.count;
                    }
                }
                [] if limb < 17 => {
                    let mut parts = [-1.0; PARTS];
                    parts[ia] = part_a;
                    parts[ib] = part_b;
                    let score = all[part_a as usize].score + all[part_b as usize].score + score;
                    people.push(Person {
                        parts,
                        score,
                        count: 2.0,
                    });
                }
                _ => {}
            }
        }
    }
    people.retain(|p| p.count >= 4.0 && p.score / p.count >= 0.4);
    (all, people)
}
