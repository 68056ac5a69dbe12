//! How generated code turns `key = <expr>` into the key a sequencer stores, and what it does
//! with a [`SequenceError`] it has no error type for.

use super::error::SequenceError;

/// What generated code does with a [`SequenceError`] when the function has no error type to
/// carry it (no `timeout`, no `store`): the only error then is re-entry, which would otherwise
/// deadlock.
#[doc(hidden)]
#[cold]
#[track_caller]
pub fn sequence_failed(function: &'static str, error: SequenceError) -> ! {
    panic!("#[sequenced] {function}: {error}")
}

/// `key = <expr>` as the sequencer stores it: a reference (`&str`, `&Id`) becomes its owned
/// form (`String`, `Id`), an owned value is moved in unchanged. Chosen at compile time by
/// method resolution: `(&&KeyWrap::new(key)).__racefree_key()` finds [`KeyByRef`] first, and
/// only for a reference; anything else falls through to [`KeyByValue`].
#[doc(hidden)]
pub struct KeyWrap<T>(std::cell::Cell<Option<T>>);

impl<T> KeyWrap<T> {
    #[doc(hidden)]
    #[inline]
    pub fn new(key: T) -> Self {
        KeyWrap(std::cell::Cell::new(Some(key)))
    }

    fn take(&self) -> T {
        self.0.take().expect("a key is taken once")
    }
}

#[doc(hidden)]
pub trait KeyByRef {
    type Owned;
    fn __racefree_key(&self) -> Self::Owned;
}

impl<T: ?Sized + ToOwned> KeyByRef for &KeyWrap<&T> {
    type Owned = T::Owned;
    #[inline]
    fn __racefree_key(&self) -> T::Owned {
        self.take().to_owned()
    }
}

#[doc(hidden)]
pub trait KeyByValue {
    type Owned;
    fn __racefree_key(&self) -> Self::Owned;
}

impl<T> KeyByValue for KeyWrap<T> {
    type Owned = T;
    #[inline]
    fn __racefree_key(&self) -> T {
        self.take()
    }
}
