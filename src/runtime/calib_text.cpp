// The default AWQ calibration text (runtime/calibrate.h): varied registers, so every kind of
// token a chat model meets moves its activations. Written for kiln; no licence attaches to it.
#include "runtime/calibrate.h"

namespace kiln {

const char* const kDefaultCalibText =
    R"CALIB(The river had been rising for three days when the ferryman finally agreed to take us across. He stood at the end of the dock with his hands in his pockets, looking at the brown water as if it owed him money. "It will hold," he said at last, "but you will pay double, and you will sit where I tell you to sit." Nobody argued. The children climbed in first, then the old woman with the basket of eggs, then the rest of us, and the little boat settled so low that water slapped over the side with every wave.

Halfway across, the engine coughed and died. For a long moment the only sound was the river itself, a deep steady hiss, and the creak of the hull as the current turned us slowly downstream. The ferryman did not hurry. He opened a wooden box, took out a length of wire and a screwdriver with a cracked handle, and began to whistle.

Why do some metals rust while others do not? Iron reacts with oxygen and water to form iron oxide, a flaky compound that falls away and exposes fresh metal beneath. Aluminium also oxidizes, but its oxide forms a thin, hard layer that seals the surface and stops the reaction. Stainless steel contains chromium, which behaves in the same protective way. This is why a cast-iron pan must be oiled after washing, while an aluminium ladder can stand in the rain for years.

Q: How many minutes are there in a week?
A: A day has 24 hours and an hour has 60 minutes, so a day has 1,440 minutes. Seven days make 7 x 1,440 = 10,080 minutes.

Q: If a train leaves at 14:35 and the journey takes 2 hours and 50 minutes, when does it arrive?
A: 14:35 plus 2 hours is 16:35; plus 50 minutes is 17:25.

def merge_sorted(a, b):
    """Merge two sorted lists into one sorted list in linear time."""
    i, j, out = 0, 0, []
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out

#include <stdio.h>
int main(void) {
    for (int i = 1; i <= 15; ++i)
        printf("%s\n", i % 15 == 0 ? "FizzBuzz" : i % 3 == 0 ? "Fizz" : i % 5 == 0 ? "Buzz" : "-");
    return 0;
}

Meeting notes, Tuesday:
- The release is moved to the 14th; the installer still fails on machines without a network.
- Maria will rewrite the retry logic so that a timeout is reported instead of ignored.
- Budget: 3 servers at $420 per month each, $15,120 for the year, approved.
- Open question: do we keep the old API for one more version, or remove it now?

Dear Mr. Okafor, thank you for your letter of 2 March. I am sorry to hear that the parcel arrived damaged. We have sent a replacement by express post, and you should receive it within five working days. Please keep the damaged item; there is no need to return it.

The committee considered the proposal carefully. Its strengths are clear: the design is simple, the cost is modest, and the first results are encouraging. Its weaknesses are equally clear: the sample is small, the measurements were taken by the authors themselves, and no attempt was made to reproduce them. We therefore recommend a second, independent trial before any decision is taken.

Temperatures tonight will fall to minus four degrees in the valleys, with fog forming after midnight. Tomorrow will be bright and cold, with light winds from the north-east and a high of six degrees. Rain, possibly heavy, is expected to reach the west coast by Thursday evening.

She closed the book, put out the lamp, and sat for a while in the dark, listening to the wind in the chimney and thinking about everything she had not said.)CALIB";

}  // namespace kiln
