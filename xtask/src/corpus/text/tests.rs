use super::*;

/// A page in the style of the kernel's and Python's documentation: title adornments, a
/// comment and a target, roles, a kept directive with options, dropped directives with blocks,
/// a literal block after `::`, a grid table.
const PAGE: &str = "\
.. SPDX-License-Identifier: GPL-2.0

.. _msi-howto:

==========================
The MSI Driver Guide HOWTO
==========================

:Authors: Tom L Nguyen

This guide describes the basics of **Message Signaled Interrupts** (*MSIs*), see
:ref:`the PCI guide <pci-guide>` and :c:func:`pci_alloc_irq_vectors`.

.. toctree::
   :maxdepth: 2

   pci
   boot-interrupts

What are MSIs?
--------------

Use ``pci_enable_msi()`` like this::

   ret = pci_enable_msi(dev);

.. note::
   The device must support MSI.

.. function:: open(file, mode='r')
   :noindex:

   Open *file* and return a `file object <https://example.org>`_.

.. code-block:: c

   int x = 1;

+------+------+
| a    | b    |
+------+------+

Done.
";

const WANT: &str = "\
The MSI Driver Guide HOWTO

:Authors: Tom L Nguyen

This guide describes the basics of Message Signaled Interrupts (MSIs), see
the PCI guide and pci_alloc_irq_vectors.

What are MSIs?

Use pci_enable_msi() like this:

   ret = pci_enable_msi(dev);

The device must support MSI.

open(file, mode='r')

Open file and return a file object.

| a    | b    |

Done.
";

#[test]
fn rst_becomes_plain_text() {
    assert_eq!(rst_to_text(PAGE), WANT);
}

#[test]
fn inline_markup_leaves_its_text() {
    let cases = [
        (":py:class:`~collections.OrderedDict`", "OrderedDict"),
        (":doc:`/admin-guide/index`", "/admin-guide/index"),
        (
            "see `PEP 8`_ and `docs <https://x.org>`__.",
            "see PEP 8 and docs.",
        ),
        ("a * b and 2*3*4", "a * b and 2*3*4"),
        ("**bold** and *it*", "bold and it"),
        ("time: 10:30 and a:b", "time: 10:30 and a:b"),
        ("``x = *y*``", "x = *y*"),
        ("unclosed ``tick", "unclosed ``tick"),
    ];
    for (rst, want) in cases {
        assert_eq!(strip_inline(rst), want, "{rst}");
    }
}

#[test]
fn the_split_is_a_function_of_the_name_alone() {
    let names: Vec<String> = (0..4000).map(|i| format!("linux--doc{i}.txt")).collect();
    let val: Vec<bool> = names.iter().map(|n| is_validation(n, 30)).collect();
    // The same answer every time and a share near 3%.
    assert_eq!(
        val,
        names
            .iter()
            .map(|n| is_validation(n, 30))
            .collect::<Vec<_>>()
    );
    let share = val.iter().filter(|v| **v).count() as f64 / names.len() as f64;
    assert!((0.015..0.045).contains(&share), "{share}");
    // Nothing in validation at 0, everything at 1000.
    assert!(names
        .iter()
        .all(|n| !is_validation(n, 0) && is_validation(n, 1000)));
    // FNV-1a's published test vectors: a fixed function, not the std hasher of the day.
    assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
}

#[test]
fn doc_names_flatten_paths() {
    assert_eq!(
        doc_name("linux", Path::new("PCI/msi-howto.rst.txt")),
        "linux--PCI--msi-howto.txt"
    );
    assert_eq!(
        doc_name("python", Path::new("about.txt")),
        "python--about.txt"
    );
}

/// The whole text half on a fixture tree: skipped folders, short pages, both splits, sizes.
#[test]
fn build_writes_both_splits_from_a_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let long = |title: &str| format!("{title}\n=====\n\n{}\n", "Some words of prose. ".repeat(20));
    let files = [
        ("a.rst.txt", long("Alpha")),
        ("sub/b.rst.txt", long("Beta")),
        ("sub/deeper/c.rst.txt", long("Gamma")),
        ("translations/zh/a.rst.txt", long("Skipped")),
        ("stub.rst.txt", "Stub\n====\n".to_string()),
        ("image.png", "not text".to_string()),
    ];
    for (rel, body) in &files {
        let p = src.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    let out = dir.path().join("out");
    let sources = [Source {
        prefix: "fx".into(),
        root: src.clone(),
        skip: vec!["translations".into()],
    }];
    // Every document to train at 0 per mille, every one to val at 1000.
    let all_train = build(&sources, &out, 0, 200).unwrap();
    assert_eq!(
        (
            all_train.train_files,
            all_train.val_files,
            all_train.skipped
        ),
        (3, 0, 1)
    );
    let mut names: Vec<String> = std::fs::read_dir(out.join("train"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["fx--a.txt", "fx--sub--b.txt", "fx--sub--deeper--c.txt"]
    );
    let a = std::fs::read_to_string(out.join("train/fx--a.txt")).unwrap();
    assert!(
        a.starts_with("Alpha\n\nSome words") && !a.contains("====="),
        "{a}"
    );
    let total: u64 = names
        .iter()
        .map(|n| std::fs::metadata(out.join("train").join(n)).unwrap().len())
        .sum();
    assert_eq!(all_train.train_bytes, total);
    // A second build into the same folder is refused (the command clears it first).
    assert!(build(&sources, &out, 0, 200)
        .unwrap_err()
        .to_string()
        .contains("exists"));
    let out2 = dir.path().join("out2");
    let all_val = build(&sources, &out2, 1000, 200).unwrap();
    assert_eq!((all_val.train_files, all_val.val_files), (0, 3));
    assert_eq!(all_val.val_bytes, all_train.train_bytes);
}
