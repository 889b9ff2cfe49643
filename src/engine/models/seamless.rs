//! Seamless tiling (A1111's "Tiling", InvokeAI's seamless axes): the convolutions of the
//! models that make the image, the UNet and the VAE, pad circularly along the axes that
//! tile (`padding_mode="circular"` on every `Conv2d`, or InvokeAI's per-axis padding:
//! circular along one axis, zeros along the other), so the image's opposite edges continue
//! each other. Other models (ControlNets, adapters, detectors, upscalers) keep zero padding.
//!
//! A request's choice holds on the thread that runs it for as long as the scope from
//! [`request`] lives; a model whose image tiles applies it inside its forward pass by
//! entering [`model`]. Both scopes restore what was there before when dropped, so nothing
//! outlives the request that set it.

use std::cell::Cell;
use std::thread::LocalKey;

use tch::Tensor;

/// The axes along which an image tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seamless {
    /// The left and right edges meet.
    pub x: bool,
    /// The top and bottom edges meet.
    pub y: bool,
}

impl Seamless {
    /// Both axes, as A1111's Tiling.
    pub const BOTH: Self = Self { x: true, y: true };
}

thread_local! {
    /// What the request running on this thread asks for.
    static REQUESTED: Cell<Option<Seamless>> = const { Cell::new(None) };
    /// What the convolutions running now on this thread apply.
    static ACTIVE: Cell<Option<Seamless>> = const { Cell::new(None) };
}

/// While alive, a setting of one of the thread's cells; the previous one comes back on drop.
#[must_use = "the setting holds only while the scope lives"]
pub struct Scope {
    cell: &'static LocalKey<Cell<Option<Seamless>>>,
    previous: Option<Seamless>,
}

impl Drop for Scope {
    fn drop(&mut self) {
        self.cell.with(|c| c.set(self.previous));
    }
}

fn set(cell: &'static LocalKey<Cell<Option<Seamless>>>, value: Option<Seamless>) -> Scope {
    let previous = cell.with(|c| c.replace(value));
    Scope { cell, previous }
}

/// The request running on this thread asks for `seamless` until the scope is dropped.
pub fn request(seamless: Option<Seamless>) -> Scope {
    set(&REQUESTED, seamless)
}

/// What the request running on this thread asks for.
pub fn requested() -> Option<Seamless> {
    REQUESTED.with(Cell::get)
}

/// Entered by a model whose image tiles (a UNet, a VAE) for its forward pass: its
/// convolutions pad as the request asks until the scope is dropped.
pub fn model() -> Scope {
    set(&ACTIVE, requested())
}

/// The input a convolution with `padding` (rows, columns) takes and the padding it then
/// adds itself: `x` as it is unless the model running now tiles, else `x` padded along
/// each axis (circularly along those that tile, with zeros along the others) and no
/// padding left.
pub fn padded(x: &Tensor, padding: [i64; 2]) -> (Tensor, [i64; 2]) {
    let active = ACTIVE.with(Cell::get);
    let Some(axes) = active.filter(|_| padding != [0, 0]) else {
        return (x.shallow_clone(), padding);
    };
    let [rows, columns] = padding;
    let pad = |t: &Tensor, amounts: [i64; 4], circular: bool| match circular {
        true => t.pad(amounts, "circular", None),
        false => t.constant_pad_nd(amounts),
    };
    // Columns first, then rows (the corners wrap along both axes, as torch's circular
    // padding of both at once).
    let x = pad(x, [columns, columns, 0, 0], axes.x);
    (pad(&x, [0, 0, rows, rows], axes.y), [0, 0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn grid() -> Tensor {
        Tensor::arange(12, (Kind::Float, Device::Cpu)).view([1, 1, 3, 4])
    }

    #[test]
    fn outside_a_tiling_model_the_convolution_pads_itself() {
        let _request = request(Some(Seamless::BOTH));
        let (x, padding) = padded(&grid(), [1, 1]);
        assert_eq!(padding, [1, 1]);
        assert_eq!(x.size(), [1, 1, 3, 4]);
    }

    #[test]
    fn both_axes_pad_as_torch_circular_padding() {
        let _request = request(Some(Seamless::BOTH));
        let _model = model();
        let (x, padding) = padded(&grid(), [1, 2]);
        assert_eq!(padding, [0, 0]);
        let expected = grid().pad([2i64, 2, 1, 1], "circular", None);
        assert_eq!(x, expected);
    }

    #[test]
    fn one_axis_wraps_and_the_other_pads_with_zeros() {
        let _request = request(Some(Seamless { x: true, y: false }));
        let _model = model();
        let (x, _) = padded(&grid(), [1, 1]);
        let row = |i: i64| Vec::<f32>::try_from(x.get(0).get(0).get(i)).expect("row");
        assert_eq!(row(0), vec![0.0; 6]);
        assert_eq!(row(1), vec![3.0, 0.0, 1.0, 2.0, 3.0, 0.0]);
        assert_eq!(row(4), vec![0.0; 6]);
    }

    #[test]
    fn scopes_restore_what_was_there() {
        {
            let _request = request(Some(Seamless::BOTH));
            {
                let _inner = request(None);
                assert_eq!(requested(), None);
            }
            assert_eq!(requested(), Some(Seamless::BOTH));
            let _model = model();
            assert_eq!(ACTIVE.with(Cell::get), Some(Seamless::BOTH));
        }
        assert_eq!(requested(), None);
        assert_eq!(ACTIVE.with(Cell::get), None);
        let (_, padding) = padded(&grid(), [1, 1]);
        assert_eq!(padding, [1, 1]);
    }
}
