//! Vision reuse across overlapping windows.
//!
//! Qwen3-VL's vision tower attends only within one temporal group (a frame pair), and its
//! position embeddings and rotary angles depend on the grid's height and width alone. A group's
//! merged tokens and DeepStack features are therefore the same in every window that contains
//! it. The cache keeps them, keyed by the group's patch rows (a 128-bit digest of their bits)
//! and its grid, least recently used first out, within a byte budget. Misses of a request are
//! encoded together, one grid per group, and the window is put back together in placeholder
//! order. `tests/reuse.rs` checks the result is bit for bit what encoding the whole window gives.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher, RandomState};

use candle_core::{Device, Result, Tensor};

use crate::vision::{VisionModel, VisionOutput};

/// Rows of one patch (3 channels x 2 frames x 16 x 16).
const PATCH: usize = 1536;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Key {
    h: usize,
    w: usize,
    digest: [u64; 2],
}

struct Entry {
    embeds: Tensor,
    deepstack: Vec<Tensor>,
    bytes: usize,
    used: u64,
}

/// Where a group's features come from.
enum Part {
    /// The cache (or a pair seen earlier in this request that was cached).
    Cached(Key),
    /// This request's encoding, at this index.
    Fresh(usize),
}

/// What one encode found in the cache.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReuseCount {
    /// Temporal groups taken from the cache (or from an identical group of the same request).
    pub hits: usize,
    /// Temporal groups encoded.
    pub misses: usize,
}

/// Encoded temporal groups, least recently used evicted first, within a byte budget.
pub struct VisionCache {
    budget: usize,
    used_bytes: usize,
    tick: u64,
    entries: HashMap<Key, Entry>,
    /// `used` tick -> key, oldest first.
    order: BTreeMap<u64, Key>,
    seeds: [RandomState; 2],
}

impl std::fmt::Debug for VisionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionCache")
            .field("budget", &self.budget)
            .field("bytes", &self.used_bytes)
            .field("groups", &self.entries.len())
            .finish()
    }
}

impl VisionCache {
    /// A cache holding at most `budget` bytes of features (0 turns reuse off).
    pub fn new(budget: usize) -> Self {
        VisionCache {
            budget,
            used_bytes: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            seeds: [RandomState::new(), RandomState::new()],
        }
    }

    /// Bytes of features held.
    pub fn bytes(&self) -> usize {
        self.used_bytes
    }

    /// Groups held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets everything (after a failure that may have left a half-made entry).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
        self.used_bytes = 0;
    }

    fn key(&self, h: usize, w: usize, rows: &[f32]) -> Key {
        let digest = self.seeds.each_ref().map(|seed| {
            let mut hasher = seed.build_hasher();
            hasher.write_usize(h);
            hasher.write_usize(w);
            hasher.write(bytemuck::cast_slice(rows));
            hasher.finish()
        });
        Key { h, w, digest }
    }

    fn touch(&mut self, key: &Key) -> Option<(Tensor, Vec<Tensor>)> {
        self.tick += 1;
        let tick = self.tick;
        let entry = self.entries.get_mut(key)?;
        self.order.remove(&entry.used);
        entry.used = tick;
        self.order.insert(tick, *key);
        Some((entry.embeds.clone(), entry.deepstack.clone()))
    }

    fn insert(&mut self, key: Key, embeds: Tensor, deepstack: Vec<Tensor>) -> Result<()> {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let bytes = size(&embeds) + deepstack.iter().map(size).sum::<usize>();
        if bytes > self.budget || self.entries.contains_key(&key) {
            return Ok(());
        }
        while self.used_bytes + bytes > self.budget {
            let Some((_, old)) = self.order.pop_first() else { break };
            if let Some(e) = self.entries.remove(&old) {
                self.used_bytes -= e.bytes;
            }
        }
        self.tick += 1;
        // Copies: a slice would keep the whole batch's storage alive.
        let entry = Entry {
            embeds: embeds.copy()?,
            deepstack: deepstack.iter().map(Tensor::copy).collect::<Result<_>>()?,
            bytes,
            used: self.tick,
        };
        self.order.insert(self.tick, key);
        self.entries.insert(key, entry);
        self.used_bytes += bytes;
        Ok(())
    }

    /// Encodes `pixel_values` (`rows x 1536` for the grids, in order) reusing every temporal
    /// group seen before, and keeps the new ones. When nothing is reused (reuse off, a new
    /// clip) the rows go to the tower as they are, not copied: a long clip's rows can be a
    /// gigabyte.
    pub fn encode(
        &mut self,
        tower: &VisionModel,
        device: &Device,
        pixel_values: Vec<f32>,
        grids: &[[usize; 3]],
    ) -> Result<(VisionOutput, ReuseCount)> {
        let rows: usize = grids.iter().map(|g| g.iter().product::<usize>()).sum();
        if pixel_values.len() != rows * PATCH {
            candle_core::bail!("{} pixel values but the grids need {}", pixel_values.len(), rows * PATCH);
        }
        // Each group: its key and where its rows are.
        let mut groups = Vec::new();
        let mut at = 0;
        for &[t, h, w] in grids {
            for _ in 0..t {
                let n = h * w * PATCH;
                let rows = &pixel_values[at..at + n];
                groups.push((if self.budget > 0 { Some(self.key(h, w, rows)) } else { None }, h, w, at, n));
                at += n;
            }
        }
        // Misses, each distinct one encoded once, all in one pass.
        let mut count = ReuseCount::default();
        let mut found: HashMap<Key, (Tensor, Vec<Tensor>)> = HashMap::new();
        // Indices of the groups to encode, and for each group where its features come from.
        let mut todo: Vec<usize> = Vec::new();
        let mut todo_keys: HashMap<Key, usize> = HashMap::new();
        let mut parts: Vec<Part> = Vec::with_capacity(groups.len());
        for (i, (key, ..)) in groups.iter().enumerate() {
            let part = match key {
                Some(k) if found.contains_key(k) => Part::Cached(*k),
                Some(k) if todo_keys.contains_key(k) => Part::Fresh(todo_keys[k]),
                Some(k) => match self.touch(k) {
                    Some(hit) => {
                        found.insert(*k, hit);
                        Part::Cached(*k)
                    }
                    None => {
                        todo_keys.insert(*k, todo.len());
                        todo.push(i);
                        count.misses += 1;
                        Part::Fresh(todo.len() - 1)
                    }
                },
                None => {
                    todo.push(i);
                    count.misses += 1;
                    Part::Fresh(todo.len() - 1)
                }
            };
            parts.push(part);
        }
        count.hits = groups.len() - count.misses;
        let mut fresh: Vec<(Tensor, Vec<Tensor>)> = Vec::with_capacity(todo.len());
        if !todo.is_empty() {
            // Every group new and distinct: they are all the rows, in order.
            let (data, miss_grids) = if todo.len() == groups.len() {
                (pixel_values, grids.to_vec())
            } else {
                let mut data = Vec::with_capacity(todo.iter().map(|&i| groups[i].4).sum());
                let mut miss_grids = Vec::with_capacity(todo.len());
                for &i in &todo {
                    let (_, h, w, at, n) = groups[i];
                    data.extend_from_slice(&pixel_values[at..at + n]);
                    miss_grids.push([1, h, w]);
                }
                (data, miss_grids)
            };
            let n_rows = data.len() / PATCH;
            let out = tower.forward(&Tensor::from_vec(data, (n_rows, PATCH), device)?, &miss_grids)?;
            let mut start = 0;
            for &i in &todo {
                let (key, h, w, ..) = groups[i];
                let merged = h * w / 4;
                let embeds = out.embeds.narrow(0, start, merged)?;
                let deepstack = out.deepstack.iter().map(|d| d.narrow(0, start, merged)).collect::<Result<Vec<_>>>()?;
                start += merged;
                if let Some(k) = key {
                    self.insert(k, embeds.clone(), deepstack.clone())?;
                }
                fresh.push((embeds, deepstack));
            }
        }
        // Put the window back together in order.
        let mut embeds = Vec::with_capacity(groups.len());
        let taps = fresh.first().map(|f| f.1.len()).or_else(|| found.values().next().map(|f| f.1.len())).unwrap_or(0);
        let mut deepstack: Vec<Vec<Tensor>> = vec![Vec::with_capacity(groups.len()); taps];
        for part in &parts {
            let part = match part {
                Part::Cached(k) => found.get(k),
                Part::Fresh(j) => fresh.get(*j),
            }
            .ok_or_else(|| candle_core::Error::Msg("vision reuse lost a frame pair".into()))?
            .clone();
            embeds.push(part.0);
            for (tap, d) in deepstack.iter_mut().zip(part.1) {
                tap.push(d);
            }
        }
        let output = VisionOutput {
            embeds: Tensor::cat(&embeds, 0)?,
            deepstack: deepstack.iter().map(|tap| Tensor::cat(tap, 0)).collect::<Result<_>>()?,
        };
        Ok((output, count))
    }
}
