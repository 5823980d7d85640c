"""The synthetic talking-face corpus (``lipsync data synth``): exactly labelled speech from
eSpeak NG, real base footage, a re-rendered mouth. See ``docs/DATA.md``.

Modules: :mod:`.text` (sentences), :mod:`.tts` (eSpeak NG with exact phone timings),
:mod:`.phones` (phone inventory and visemes), :mod:`.visemes` (co-articulated viseme track),
:mod:`.faces` (base footage, landmarks, augmentation), :mod:`.render` (mouth renderer),
:mod:`.corpus` (plan, splits, parallel and resumable generation).
"""
