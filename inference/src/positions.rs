//! 3-D position ids for the text decoder (`get_rope_index` of transformers 5.24).

/// Position ids of a prompt on the three MRoPE axes, and the delta that continues them during
/// decoding (`position = cache_index + rope_delta` on every axis).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptPositions {
    /// T, H and W positions, one entry per prompt token each.
    pub axes: [Vec<i64>; 3],
    /// `max(position) + 1 - prompt_len`.
    pub rope_delta: i64,
}

/// Token kinds for position purposes (transformers' `mm_token_type_ids`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Ordinary text.
    Text = 0,
    /// An image placeholder.
    Image = 1,
    /// A video placeholder.
    Video = 2,
}

/// Computes position ids. Each maximal run of image (or video) placeholders consumes the next
/// grid of that kind; a video grid `[t, h, w]` stands for `t` runs of `[1, h, w]`, one per
/// temporal group (each group sits between its own timestamp and vision markers).
pub fn rope_index(
    kinds: &[TokenKind],
    image_grids: &[[usize; 3]],
    video_grids: &[[usize; 3]],
    merge: usize,
) -> Result<PromptPositions, String> {
    let mut images = image_grids.iter().copied();
    let mut videos = video_grids.iter().flat_map(|&[t, h, w]| std::iter::repeat_n([1, h, w], t));
    let mut axes = [Vec::with_capacity(kinds.len()), Vec::with_capacity(kinds.len()), Vec::with_capacity(kinds.len())];
    let mut next: i64 = 0;
    let mut i = 0;
    while i < kinds.len() {
        let kind = kinds[i];
        let run = kinds[i..].iter().take_while(|&&k| k == kind).count();
        match kind {
            TokenKind::Text => {
                for j in 0..run as i64 {
                    for a in &mut axes {
                        a.push(next + j);
                    }
                }
                next += run as i64;
            }
            TokenKind::Image | TokenKind::Video => {
                let grid = if kind == TokenKind::Image { images.next() } else { videos.next() };
                let [t, h, w] = grid.ok_or_else(|| format!("more {kind:?} placeholder runs than grids"))?;
                let (gh, gw) = (h / merge, w / merge);
                if t * gh * gw != run {
                    return Err(format!("a {kind:?} run of {run} tokens does not match grid [{t}, {h}, {w}]"));
                }
                for tt in 0..t as i64 {
                    for hh in 0..gh as i64 {
                        for ww in 0..gw as i64 {
                            axes[0].push(next + tt);
                            axes[1].push(next + hh);
                            axes[2].push(next + ww);
                        }
                    }
                }
                next += gh.max(gw) as i64;
            }
        }
        i += run;
    }
    if images.next().is_some() || videos.next().is_some() {
        return Err("fewer placeholder runs than grids".into());
    }
    let max = axes.iter().flat_map(|a| a.iter()).copied().max().unwrap_or(-1);
    Ok(PromptPositions { rope_delta: max + 1 - kinds.len() as i64, axes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use TokenKind::*;

    #[test]
    fn worked_example_from_the_spec() {
        // [im_start, user, \n, vision_start, P,P,P,P, vision_end, "Hi", im_end, \n, im_start, assistant, \n]
        let mut kinds = vec![Text; 4];
        kinds.extend([Image; 4]);
        kinds.extend([Text; 7]);
        let p = rope_index(&kinds, &[[1, 4, 4]], &[], 2).unwrap();
        assert_eq!(p.axes[0], vec![0, 1, 2, 3, 4, 4, 4, 4, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(p.axes[1][4..8], [4, 4, 5, 5]);
        assert_eq!(p.axes[2][4..8], [4, 5, 4, 5]);
        assert_eq!(p.rope_delta, -2);
    }

    #[test]
    fn mismatched_runs_are_errors() {
        assert!(rope_index(&[Text, Video, Video], &[], &[[1, 4, 4]], 2).is_err());
        assert!(rope_index(&[Text], &[], &[[1, 4, 4]], 2).is_err());
    }
}
