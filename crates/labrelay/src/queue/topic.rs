//! AMQP topic matching for the embedded broker, with RabbitMQ's rules: keys and patterns
//! are dot-separated words, `*` matches exactly one word, `#` zero or more, and the
//! empty string has no words (so `#` matches `""` but `*` does not).

/// Whether routing `key` matches binding `pattern`.
pub(crate) fn matches(pattern: &str, key: &str) -> bool {
    let p = words(pattern);
    let k = words(key);
    // reach[j]: the first i pattern words can match the first j key words. Dynamic
    // programming keeps patterns like `#.#.#.x` linear instead of exponential.
    let mut reach = vec![false; k.len() + 1];
    reach[0] = true;
    for word in &p {
        let mut next = vec![false; k.len() + 1];
        match *word {
            "#" => {
                let mut any = false;
                for (n, r) in next.iter_mut().zip(&reach) {
                    any |= *r;
                    *n = any;
                }
            }
            "*" => {
                for (n, r) in next[1..].iter_mut().zip(&reach) {
                    *n = *r;
                }
            }
            literal => {
                for ((n, r), w) in next[1..].iter_mut().zip(&reach).zip(&k) {
                    *n = *r && *w == literal;
                }
            }
        }
        reach = next;
    }
    reach[k.len()]
}

fn words(s: &str) -> Vec<&str> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split('.').collect()
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn literal_words_must_be_equal() {
        assert!(matches("lims.sample.created", "lims.sample.created"));
        assert!(!matches("lims.sample.created", "lims.sample.deleted"));
        assert!(!matches("lims.sample", "lims.sample.created"));
        assert!(!matches("lims.sample.created", "lims.sample"));
    }

    #[test]
    fn star_is_exactly_one_word() {
        assert!(matches("lims.*.created", "lims.sample.created"));
        assert!(!matches("lims.*.created", "lims.created"));
        assert!(!matches("lims.*.created", "lims.a.b.created"));
        assert!(matches("*", "x"));
        assert!(!matches("*", ""));
        assert!(!matches("*", "a.b"));
        // An empty word between dots is still a word.
        assert!(matches("a.*.b", "a..b"));
    }

    #[test]
    fn hash_is_zero_or_more_words() {
        assert!(matches("#", ""));
        assert!(matches("#", "a"));
        assert!(matches("#", "a.b.c"));
        assert!(matches("lims.#", "lims"));
        assert!(matches("lims.#", "lims.sample.created"));
        assert!(!matches("lims.#", "crm.sample"));
        assert!(matches("#.created", "created"));
        assert!(matches("#.created", "lims.sample.created"));
        assert!(!matches("#.created", "lims.created.not"));
        assert!(matches("a.#.z", "a.z"));
        assert!(matches("a.#.z", "a.b.c.z"));
        assert!(matches("#.b.#", "a.b.c"));
        assert!(!matches("#.b.#", "a.c"));
        assert!(matches("*.#", "a"));
        assert!(!matches("*.#", ""));
    }

    #[test]
    fn empty_pattern_matches_only_the_empty_key() {
        assert!(matches("", ""));
        assert!(!matches("", "a"));
    }

    #[test]
    fn many_hashes_stay_fast() {
        let pattern = "#.".repeat(40) + "x";
        let key = "a.".repeat(200) + "y";
        assert!(!matches(&pattern, &key));
        assert!(matches(&pattern, &("a.".repeat(200) + "x")));
    }
}
