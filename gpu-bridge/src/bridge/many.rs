//! The answers of one [`execute_many`](crate::GpuBridge::execute_many)
//! call: every answer's bytes in one buffer, and each request's outcome
//! (where its bytes are, or its error) in input order.
//!
//! # Rules
//!
//! 1. **One buffer.** The answers' bytes are appended to one `Vec<u8>` as
//!    they are taken from the call's groups: no allocation per ring answer
//!    (the buffer is sized for the ring answers up front, and grows only
//!    for answers longer than their inputs or from the batch path, which
//!    makes its own). A caller that wants a `Vec` per answer asks for them
//!    ([`ManyAnswers::into_vecs`], or iterating by value) and pays for
//!    them then.
//! 2. **Input order.** Outcome `i` is request `i`'s: its answer's range in
//!    the buffer, or its own error. Ranges are handed out by
//!    [`ManyAnswers::push`] only, each the bytes it appended, so every range
//!    lies inside the buffer and no two overlap.

use std::iter::FusedIterator;
use std::ops::Range;

use super::error::ExecuteError;

/// The answers of one [`GpuBridge::execute_many`](crate::GpuBridge::execute_many)
/// call, in input order, each its own `Result`; every answer's bytes live in
/// one buffer (rule 1).
///
/// ```
/// # async fn example(bridge: &granary_gpu::GpuBridge) -> Result<(), granary_gpu::ExecuteError> {
/// let inputs = [[1.0f32, 2.0].map(f32::to_le_bytes).concat()];
/// let answers = bridge.execute_many("double", &inputs).await;
/// // Borrowed: each answer's bytes in place, or its error.
/// for answer in &answers {
///     match answer {
///         Ok(bytes) => println!("{} bytes", bytes.len()),
///         Err(err) => eprintln!("refused: {err}"),
///     }
/// }
/// // Owned: a `Vec` per answer, and errors by value (so `?` works).
/// for answer in answers {
///     let bytes: Vec<u8> = answer?;
///     assert_eq!(bytes.len(), 8);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManyAnswers {
    bytes: Vec<u8>,
    outcomes: Vec<Result<Range<usize>, ExecuteError>>,
}

impl ManyAnswers {
    /// Room for `requests` outcomes and `bytes` bytes of answers.
    pub(crate) fn with_capacity(requests: usize, bytes: usize) -> ManyAnswers {
        ManyAnswers {
            bytes: Vec::with_capacity(bytes),
            outcomes: Vec::with_capacity(requests),
        }
    }

    /// Appends the next request's outcome (rule 2): its answer's bytes are
    /// copied to the end of the buffer.
    pub(crate) fn push(&mut self, outcome: Result<&[u8], ExecuteError>) {
        let outcome = outcome.map(|answer| {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(answer);
            start..self.bytes.len()
        });
        self.outcomes.push(outcome);
    }

    /// How many requests the call made (answered or not).
    pub fn len(&self) -> usize {
        self.outcomes.len()
    }

    /// Whether the call made no request.
    pub fn is_empty(&self) -> bool {
        self.outcomes.is_empty()
    }

    /// Request `index`'s answer, or its error; `None` past the last
    /// request.
    pub fn get(&self, index: usize) -> Option<Result<&[u8], &ExecuteError>> {
        self.outcomes
            .get(index)
            .map(|outcome| resolve(&self.bytes, outcome))
    }

    /// Every request's answer or error, in input order.
    pub fn iter(&self) -> ManyAnswersIter<'_> {
        ManyAnswersIter {
            bytes: &self.bytes,
            outcomes: self.outcomes.iter(),
        }
    }

    /// How many requests were answered (not refused or failed).
    pub fn answered(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|outcome| outcome.is_ok())
            .count()
    }

    /// Every answer's bytes, back to back in input order (refused requests
    /// add none).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The buffer and each request's outcome: the range of its answer in
    /// the buffer, or its error.
    pub fn into_parts(self) -> (Vec<u8>, Vec<Result<Range<usize>, ExecuteError>>) {
        (self.bytes, self.outcomes)
    }

    /// A `Vec` per answer (one allocation each), in input order.
    pub fn into_vecs(self) -> Vec<Result<Vec<u8>, ExecuteError>> {
        self.into_iter().collect()
    }
}

/// An outcome's bytes or error.
fn resolve<'a>(
    bytes: &'a [u8],
    outcome: &'a Result<Range<usize>, ExecuteError>,
) -> Result<&'a [u8], &'a ExecuteError> {
    match outcome {
        Ok(range) => Ok(slice(bytes, range.clone())),
        Err(err) => Err(err),
    }
}

/// A range of the buffer; every range `push` hands out lies inside it
/// (rule 2), so the empty fallback is never taken.
fn slice(bytes: &[u8], range: Range<usize>) -> &[u8] {
    debug_assert!(range.end <= bytes.len(), "rule 2: ranges lie in the buffer");
    bytes.get(range).unwrap_or_default()
}

/// An outcome's bytes in a `Vec` of their own, or its error.
fn owned(
    bytes: &[u8],
    outcome: Result<Range<usize>, ExecuteError>,
) -> Result<Vec<u8>, ExecuteError> {
    outcome.map(|range| slice(bytes, range).to_vec())
}

/// The answers of a [`ManyAnswers`], borrowed, in input order
/// ([`ManyAnswers::iter`]).
#[derive(Debug, Clone)]
pub struct ManyAnswersIter<'a> {
    bytes: &'a [u8],
    outcomes: std::slice::Iter<'a, Result<Range<usize>, ExecuteError>>,
}

impl<'a> Iterator for ManyAnswersIter<'a> {
    type Item = Result<&'a [u8], &'a ExecuteError>;

    fn next(&mut self) -> Option<Self::Item> {
        let bytes = self.bytes;
        self.outcomes.next().map(|outcome| resolve(bytes, outcome))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.outcomes.size_hint()
    }
}

impl DoubleEndedIterator for ManyAnswersIter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        let bytes = self.bytes;
        self.outcomes
            .next_back()
            .map(|outcome| resolve(bytes, outcome))
    }
}

impl ExactSizeIterator for ManyAnswersIter<'_> {}

impl FusedIterator for ManyAnswersIter<'_> {}

impl<'a> IntoIterator for &'a ManyAnswers {
    type Item = Result<&'a [u8], &'a ExecuteError>;
    type IntoIter = ManyAnswersIter<'a>;

    fn into_iter(self) -> ManyAnswersIter<'a> {
        self.iter()
    }
}

/// The answers of a [`ManyAnswers`], owned, in input order: a `Vec` per
/// answer (one allocation each) and errors by value.
#[derive(Debug, Clone)]
pub struct ManyAnswersIntoIter {
    bytes: Vec<u8>,
    outcomes: std::vec::IntoIter<Result<Range<usize>, ExecuteError>>,
}

impl Iterator for ManyAnswersIntoIter {
    type Item = Result<Vec<u8>, ExecuteError>;

    fn next(&mut self) -> Option<Self::Item> {
        let bytes = &self.bytes;
        self.outcomes.next().map(|outcome| owned(bytes, outcome))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.outcomes.size_hint()
    }
}

impl DoubleEndedIterator for ManyAnswersIntoIter {
    fn next_back(&mut self) -> Option<Self::Item> {
        let bytes = &self.bytes;
        self.outcomes
            .next_back()
            .map(|outcome| owned(bytes, outcome))
    }
}

impl ExactSizeIterator for ManyAnswersIntoIter {}

impl FusedIterator for ManyAnswersIntoIter {}

impl IntoIterator for ManyAnswers {
    type Item = Result<Vec<u8>, ExecuteError>;
    type IntoIter = ManyAnswersIntoIter;

    fn into_iter(self) -> ManyAnswersIntoIter {
        ManyAnswersIntoIter {
            bytes: self.bytes,
            outcomes: self.outcomes.into_iter(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> ManyAnswers {
        let mut answers = ManyAnswers::with_capacity(3, 0);
        answers.push(Ok(&[1, 2, 3]));
        answers.push(Err(ExecuteError::ShutDown));
        answers.push(Ok(&[]));
        answers
    }

    #[test]
    fn outcomes_keep_input_order_and_their_own_bytes() {
        let answers = three();
        assert_eq!(answers.len(), 3);
        assert!(!answers.is_empty());
        assert_eq!(answers.answered(), 2);
        assert_eq!(answers.get(0), Some(Ok(&[1u8, 2, 3][..])));
        assert_eq!(answers.get(1), Some(Err(&ExecuteError::ShutDown)));
        assert_eq!(answers.get(2), Some(Ok(&[][..])));
        assert_eq!(answers.get(3), None);
        assert_eq!(answers.bytes(), &[1, 2, 3]);
        let forward: Vec<_> = answers.iter().collect();
        let mut backward: Vec<_> = answers.iter().rev().collect();
        backward.reverse();
        assert_eq!(forward, backward);
        assert_eq!(answers.iter().len(), 3);
    }

    #[test]
    fn into_vecs_and_into_parts_agree_with_get() {
        let answers = three();
        let vecs = answers.clone().into_vecs();
        assert_eq!(
            vecs,
            vec![Ok(vec![1, 2, 3]), Err(ExecuteError::ShutDown), Ok(vec![])]
        );
        let owned: Vec<_> = answers.clone().into_iter().rev().collect();
        assert_eq!(owned.len(), 3);
        assert_eq!(owned[0], Ok(vec![]));
        assert_eq!(owned[2], Ok(vec![1, 2, 3]));
        let (bytes, outcomes) = answers.into_parts();
        assert_eq!(bytes, vec![1, 2, 3]);
        assert_eq!(
            outcomes,
            vec![Ok(0..3), Err(ExecuteError::ShutDown), Ok(3..3)]
        );
    }

    #[test]
    fn no_requests_means_no_answers() {
        let answers = ManyAnswers::default();
        assert!(answers.is_empty());
        assert_eq!(answers.iter().next(), None);
        assert!(answers.into_vecs().is_empty());
    }
}
